"""Every Hydra group composes and maps onto a valid Flower run config (no simulation)."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from flower_focal.config import RunConfig
from simulations.run import to_federation, to_run_config

CONF = Path(__file__).resolve().parents[1] / "simulations" / "conf"


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="config", overrides=[*overrides, "run_dir=/tmp/x"], return_hydra_config=False)


GROUPS = {
    group: sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    for group in ("strategy", "dataset", "model", "partition")
}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_each_group_option_composes_to_a_valid_run_config(group, option):
    overrides = [f"{group}={option}"]
    if group == "dataset" and option in ("medmnist", "folder", "csv"):
        overrides.append("dataset.path=/data/somewhere")
    cfg = to_run_config(_compose(overrides))
    assert isinstance(cfg, RunConfig)
    assert Path(cfg.run_dir).is_absolute()


def test_overrides_reach_the_run_config():
    cfg = _compose(["strategy=he_fedavg", "dataset=pathmnist", "dataset.path=rel/p.npz", "num_institutions=7",
                    "num_rounds=4", "seed=9", "partition=iid", "train.lr=0.2", "strategy.he.preset=bfv"])
    rc = to_run_config(cfg)
    assert (rc.strategy, rc.dataset, rc.num_server_rounds, rc.seed, rc.partitioner, rc.lr, rc.he_preset) == (
        "he-fedavg", "medmnist", 4, 9, "iid", 0.2, "bfv")
    assert Path(rc.data_path).is_absolute() and rc.data_path.endswith("rel/p.npz")
    assert rc.min_available_nodes == 7
    assert to_federation(cfg).num_supernodes == 7


def test_file_datasets_require_a_path():
    from omegaconf.errors import MissingMandatoryValue

    with pytest.raises(MissingMandatoryValue):
        to_run_config(_compose(["dataset=medmnist"]))


def _other_value(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 3
    return f"other-{value}" if value else "/abs/other"


def test_every_setting_reaches_the_run_config_from_hydra():
    """Each RunConfig field's Hydra path (declared once, in its metadata) sets it; so does +run.<key>."""
    import dataclasses

    defaults = RunConfig()
    by_group: dict[str, list[tuple[str, str, object]]] = {}
    for f in dataclasses.fields(RunConfig):
        path = f.metadata["hydra"]
        assert path, f"{f.name} has no Hydra path"
        if f.name == "run_dir":  # the test's own run_dir override comes last
            continue
        group = "strategy=focal" if path.startswith("strategy.focal") else (
            "strategy=he_fedavg" if path.startswith("strategy.he") else "strategy=fedavg")
        by_group.setdefault(group, []).append((f.name, path, _other_value(getattr(defaults, f.name))))
    for group, items in by_group.items():
        def text(value):
            return str(value).lower() if isinstance(value, bool) else value
        if group != "strategy=fedavg":  # strategy.name itself is set in the fedavg group's batch
            items = [i for i in items if i[1] != "strategy.name"]
        got = to_run_config(_compose([group, *(f"++{path}={text(want)}" for _, path, want in items)]))
        via_run = to_run_config(_compose([group, *(f"+run.{name.replace('_', '-')}={text(want)}"
                                                    for name, _, want in items)]))
        for name, path, want in items:
            assert getattr(got, name) == want, (name, path, getattr(got, name))
            assert getattr(via_run, name) == want, (name, "run." + name.replace("_", "-"))


def test_a_ray_cluster_address_reaches_the_federation_and_refuses_private_ray_sizes():
    assert to_federation(_compose([])).ray_address is None  # default: a private Ray per run
    fed = to_federation(_compose(["federation.ray_address=10.0.0.1:6379"]))
    assert fed.ray_address == "10.0.0.1:6379"
    with pytest.raises(ValueError, match="the cluster's own nodes give the resources"):
        to_federation(_compose(["federation.ray_address=10.0.0.1:6379", "federation.ray_num_cpus=4"]))


def test_without_a_cluster_address_every_run_gets_a_private_ray():
    """ray.init() would otherwise join the last `ray start` cluster on the machine, even a dead one."""
    from flower_focal.simulation import Federation

    assert Federation().ray_env() == {"RAY_ADDRESS": "local"}
    assert Federation(ray_address="10.0.0.1:6379").ray_env() == {"RAY_ADDRESS": "10.0.0.1:6379"}


def test_train_lr_of_a_comparison_multirun_does_not_reach_focal(tmp_path):
    """`-m strategy=fedavg,he_fedavg,focal train.lr=0.05`: the FedAvg family gets 0.05, FOCAL keeps
    its own derived step (focal-lr 0 = step_scale * K / (d + 1) on standardised features)."""
    from flower_focal.crypto import keygen
    from flower_focal.strategy import build_strategy

    fedavg = to_run_config(_compose(["strategy=fedavg", "train.lr=0.05"]))
    focal = to_run_config(_compose(["strategy=focal", "train.lr=0.05"]))
    assert fedavg.lr == 0.05 and focal.focal_lr == 0.0
    assert (focal.focal_step_scale, focal.focal_momentum, focal.focal_standardize, focal.focal_guard) == (
        RunConfig().focal_step_scale, RunConfig().focal_momentum, True, True)
    keys = keygen(tmp_path / "k", "focal")
    strategy = build_strategy(focal.replace(he_key_dir=str(keys)))
    assert strategy.lr is None and strategy.standardize and strategy.guard_on
    explicit = build_strategy(focal.replace(he_key_dir=str(keys), focal_lr=0.02))
    assert explicit.lr == 0.02
