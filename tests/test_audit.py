"""Privacy audit: the attack is real on plaintext updates and has nothing to work on under HE."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from flower_focal.audit import SSIM_THRESHOLD, AuditConfig, run_audit
from flower_focal.audit import attacks, metrics
from flower_focal.cli import main as cli_main
from flower_focal.config import RunConfig
from flower_focal.models import build_model

CONTRACT_KEYS = {"strategy", "threat", "leakage_rate", "ssim_threshold", "rule", "ssim", "psnr",
                 "attackable", "reason", "institution_side", "config", "wall_time_s"}


# ------------------------------------------------------------------------------ pieces
def _one_sample_gradient(model, x, y):
    params = [p for _, p in model.named_parameters()]
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    return {n: g.detach() for (n, _), g in zip(model.named_parameters(), grads, strict=True)}


def test_gradient_estimate_of_one_sgd_step_is_the_gradient_and_labels_come_from_its_sign():
    torch.manual_seed(0)
    model = build_model("lenet-sigmoid", 3, 9, 32)
    x, y = torch.rand(1, 3, 32, 32) * 2 - 1, torch.tensor([6])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    true = _one_sample_gradient(model, x, y)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.0)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    est = attacks.estimate_gradient(before, model.state_dict(), list(true), lr=0.05, local_steps=1)
    for name, g in true.items():
        torch.testing.assert_close(est[name], g, atol=2e-4, rtol=2e-3)
    weight, bias = attacks.last_linear(model)
    assert (weight, bias) == ("fc.weight", "fc.bias")
    assert attacks.recover_labels(est, weight, bias, 1).tolist() == [6]
    # a batch of three: the classes present are found from the bias gradient
    xb, yb = torch.rand(3, 3, 32, 32) * 2 - 1, torch.tensor([1, 4, 4])
    assert sorted(attacks.recover_labels(_one_sample_gradient(model, xb, yb), weight, bias, 3).tolist()) == [1, 4, 4]
    with pytest.raises(ValueError, match="missing"):
        attacks.estimate_gradient(before, {}, ["fc.weight"], lr=0.05, local_steps=1)


def test_scoring_aligns_flips_and_matches_a_shuffled_batch():
    torch.manual_seed(1)
    truth = torch.rand(3, 3, 32, 32)
    recon = torch.stack([torch.flip(truth[2], dims=(-1,)), truth[0], torch.rot90(truth[1], 1, (-2, -1))])
    score = metrics.score_batch(recon, truth)
    assert score.matched == [1, 2, 0]
    assert all(s > 0.999 for s in score.ssim)
    assert score.transform[0] == 0 and score.transform[1] != 0 and score.transform[2] != 0
    noise = metrics.score_batch(torch.rand(3, 3, 32, 32), truth)
    assert max(noise.ssim) < 0.3  # an unrelated image is far below the threshold
    summary = metrics.leakage_summary([0.9, 0.59, 0.6], [20.0, 10.0, 12.0], baseline=[0.1, 0.1, 0.1])
    assert summary["leakage_rate"] == pytest.approx(2 / 3) and summary["leaked"] == 2


def test_a_flat_guess_on_a_near_uniform_tile_is_not_counted_as_a_leak():
    torch.manual_seed(2)
    tile = (0.55 + 0.01 * torch.randn(1, 3, 32, 32)).clamp(0, 1)  # e.g. a background tile
    grey = torch.full_like(tile, 0.5)  # what an attack that learned nothing returns
    score = metrics.score_batch(grey, tile)
    assert score.ssim[0] >= SSIM_THRESHOLD  # SSIM alone would call this a leak
    assert score.baseline[0] >= score.ssim[0]
    summary = metrics.leakage_summary(score.ssim, score.psnr, baseline=score.baseline)
    assert summary["ssim_only_leakage_rate"] == 1.0 and summary["leakage_rate"] == 0.0


def test_audit_config_validates_and_follows_a_run_config():
    with pytest.raises(ValueError, match="strategy"):
        AuditConfig(strategy="secure-agg")
    with pytest.raises(ValueError, match="noise"):
        AuditConfig(dp_noise_multiplier=1.0)
    with pytest.raises(ValueError, match="sgd"):
        AuditConfig(optimizer="adam")
    run = RunConfig(strategy="he-fedavg", model="lenet-sigmoid", batch_size=4, local_epochs=2, seed=5,
                    he_clip_norm=0.5, he_noise_multiplier=0.3, dataset="synthetic-retina",
                    he_key_dir="/run/keys", he_preset="bfv")
    cfg = AuditConfig.from_run_config(run, num_samples=8)
    assert (cfg.strategy, cfg.model, cfg.batch_size, cfg.local_steps, cfg.seed) == ("he-fedavg", "lenet-sigmoid", 4, 2, 5)
    assert (cfg.dp_clip_norm, cfg.dp_noise_multiplier, cfg.num_samples) == (0.5, 0.3, 8)
    assert cfg.num_institutions == 2
    assert (cfg.he_key_dir, cfg.he_preset) == ("", "bfv")  # own temporary keys of the run's preset
    with pytest.raises(ValueError, match="unknown"):
        AuditConfig.from_run_config(run, nonsense=1)


# ------------------------------------------------------------------------------ end to end
@pytest.mark.slow  # a real gradient-inversion attack: minutes of CPU
def test_plaintext_batch1_update_leaks_a_recognisable_image(tmp_path):
    cfg = AuditConfig(strategy="fedavg", dataset="pathmnist", model="lenet-sigmoid", batch_size=1,
                      num_samples=2, iterations=400, seed=0)
    result = run_audit(cfg, out_dir=tmp_path)
    assert CONTRACT_KEYS <= set(result)
    assert result["threat"] == "server" and result["attackable"] is True
    assert result["ssim_threshold"] == SSIM_THRESHOLD and "SSIM >= 0.6" in result["rule"]
    assert len(result["ssim"]) == len(result["psnr"]) == 2
    print("fedavg lenet bs1 ssim", result["ssim"], "psnr", result["psnr"])
    assert min(result["ssim"]) >= SSIM_THRESHOLD and result["leakage_rate"] == 1.0
    assert min(result["psnr"]) > 15.0
    assert result["label_accuracy"] == 1.0
    # what the server read is the plaintext state of the real client (Flower Arrays)
    assert all(a["stype"] == "numpy.ndarray" for a in result["observed"]["arrays"])
    assert json.loads((tmp_path / "audit.json").read_text()) == result
    assert (tmp_path / "audit.png").stat().st_size > 5000


def test_he_fedavg_replies_give_the_server_nothing_and_institution_side_is_reported(tmp_path):
    cfg = AuditConfig(strategy="he-fedavg", dataset="pathmnist", model="lenet-sigmoid", batch_size=1,
                      num_samples=2, aggregate_size=2, iterations=20)
    result = run_audit(cfg, out_dir=tmp_path)
    assert CONTRACT_KEYS <= set(result)
    assert result["attackable"] is False and result["leakage_rate"] == 0.0
    assert result["ssim"] == [] and result["psnr"] == []
    outcomes = {c["check"]: c["outcome"] for c in result["checks"]}
    assert outcomes["float tensors of the model's parameter shapes in the replies"].startswith("0 found")
    assert outcomes["read a reply Array as numbers (Array.numpy())"].startswith("TypeError")
    assert outcomes["build a decrypting context from the server's public.ctx"].startswith("ValueError")
    assert outcomes["the server's context has a decrypt method"] == "False"
    assert all(a["stype"] == "he/flower-focal" for a in result["observed"]["arrays"])
    inst = result["institution_side"]
    assert inst["threat"] == "institution" and inst["attackable"] is True
    assert inst["attacked"] == 2 and len(inst["ssim"]) == 2 and inst["victims_per_aggregate"] == [2]


def test_focal_server_sees_only_ciphertexts(tmp_path):
    cfg = AuditConfig(strategy="focal", dataset="synthetic-pathology", num_samples_source=120,
                      batch_size=1, num_samples=2, backbone="monai-resnet18", backbone_input_size=32,
                      lr=0.5)
    result = run_audit(cfg, out_dir=tmp_path)
    assert result["attackable"] is False and result["leakage_rate"] == 0.0 and result["ssim"] == []
    assert set(result["observed"]["message_types"]) == {"train.embed", "train.focal"}
    outcomes = {c["check"]: c["outcome"] for c in result["checks"]}
    assert outcomes["build FOCAL's decrypting CkksKeyHolder from the server's context"].startswith("ValueError")
    assert result["institution_side"]["applicable"] is False
    assert "embedding" in result["institution_side"]["reason"]
    assert (tmp_path / "audit.png").is_file()


def test_cli_audit_with_dp_writes_json_and_png_and_clips_what_the_server_sees(tmp_path, capsys):
    out = tmp_path / "audit"
    rc = cli_main(["audit", "--strategy", "fedavg", "--dataset", "synthetic-retina", "--model", "lenet-sigmoid",
                   "--num-samples", "1", "--iterations", "10", "--dp-clip-norm", "0.05",
                   "--dp-noise-multiplier", "0.1", "--out", str(out)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["strategy"] == "fedavg" and summary["dp_after_noise_leakage_rate"] is not None
    doc = json.loads((out / "audit.json").read_text())
    assert doc["leakage_rate"] == summary["leakage_rate"]
    assert doc["dp"]["noise_multiplier"] == 0.1 and doc["dp"]["after_noise"]["noise_std"] == pytest.approx(0.005)
    assert max(doc["observed"]["update_l2_norms"]) <= 0.05 * (1 + 1e-4)  # Flower's fixedclipping_mod ran
    assert (out / "audit.png").is_file()
    assert cli_main(["audit", "--dataset", "nope", "--out", str(tmp_path / "x")]) == 2
