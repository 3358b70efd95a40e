"""Check a run's settings, data and keys in this process, before Flower or Ray starts.

A mistake in a run config (a missing data file, an ``.npz`` without the expected keys, a
corrupt image, more institutions than the data can feed, an unknown strategy) otherwise
surfaces only after ``flwr run`` has started a SuperLink, Ray and every ClientApp: a minute
later, as the same error repeated by every institution. :func:`preflight` finds those mistakes in a few
seconds and raises one :class:`PreflightError` whose message names the file or value.

It loads the data source exactly as the institutions will (:func:`flower_focal.data.
source_info`, :func:`flower_focal.data.describe_partitions`: the same loaders, partitioner
and per-process caches), decodes every image file of a folder / CSV source with the
institutions' reader, and checks the HE key directory. Used by
:func:`flower_focal.simulation.simulate` (every ``python -m simulations.run``) and by
``flower-focal check`` (deployments).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flower_focal.config import RunConfig, check_personalisation

KEY_ROLES = ("all", "server", "institution")
"""Which key files :func:`preflight` requires: both, ``public.ctx`` only, ``secret.ctx`` only."""


class PreflightError(ValueError):
    """A run that cannot work, found before anything was started. The message names the
    setting, file or value to fix."""


@dataclass(frozen=True)
class PreflightReport:
    """What :func:`preflight` checked (all of it passed)."""

    strategy: str
    dataset: str
    data_path: str
    num_institutions: int
    num_classes: int
    in_channels: int
    n_train: int
    n_val: int
    institution_train_sizes: list[int]
    institution_val_sizes: list[int]
    images_decoded: int
    model: str
    device: str
    key_dir: str = ""
    key_preset: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    institution_train_histograms: list[list[int]] = field(default_factory=list)
    institution_val_histograms: list[list[int]] = field(default_factory=list)

    def summary(self) -> str:
        """One line for humans."""
        tr = self.institution_train_sizes
        data = self.data_path or self.dataset
        keys = f"; keys {self.key_dir} ({self.key_preset})" if self.key_dir else ""
        return (
            f"preflight ok in {self.seconds:.1f} s: {self.strategy}, {data}: {self.n_train} train / "
            f"{self.n_val} val, {self.num_classes} classes, {self.in_channels} channel(s); "
            f"{self.num_institutions} institutions with {min(tr)}..{max(tr)} training items "
            + (f"(sizes {tr})" if len(tr) <= 20 else "") + f"; model {self.model} on {self.device}"
            + (f"; {self.images_decoded} image files decoded" if self.images_decoded else "")
            + keys
        )

    def institutions_table(self, limit: int = 20) -> str:
        """Every institution's size and class histogram, one line each (the first and last
        ``limit // 2`` beyond ``limit`` institutions, with the count left out)."""
        rows = list(range(self.num_institutions))
        if len(rows) > limit:
            rows = rows[: limit // 2] + [-1] + rows[-(limit // 2):]
        width = len(str(self.num_institutions - 1))
        lines = []
        for k in rows:
            if k < 0:
                lines.append(f"  ... {self.num_institutions - 2 * (limit // 2)} more institutions")
                continue
            train = self.institution_train_histograms[k] if self.institution_train_histograms else []
            val = self.institution_val_histograms[k] if self.institution_val_histograms else []
            lines.append(f"  institution {k:>{width}}: {self.institution_train_sizes[k]:>5} train "
                         f"{train}, {self.institution_val_sizes[k]:>4} val {val}")
        return "institutions (items per class):\n" + "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def failure_line(exc: PreflightError) -> str:
    """The one line a launcher prints when the preflight refuses a run (no traceback)."""
    return f"flower-focal: preflight failed, nothing was started: {exc}"


def _fail(message: str, cause: BaseException | None = None) -> PreflightError:
    err = PreflightError(message)
    err.__cause__ = cause
    return err


def check_settings(cfg: RunConfig, num_institutions: int) -> None:
    """Strategy, model / backbone, optimizer, partitioner, device and node counts."""
    from flower_focal.strategy.specs import strategy_spec

    try:
        spec = strategy_spec(cfg.strategy)
    except ValueError as exc:
        raise _fail(f"strategy: {exc}") from None
    if num_institutions < 1:
        raise _fail(f"num_institutions must be >= 1, got {num_institutions}")
    if cfg.min_available_nodes > num_institutions:
        raise _fail(
            f"min-available-nodes={cfg.min_available_nodes} but only {num_institutions} "
            "institutions: the server would wait for nodes that never come; lower "
            "min-available-nodes or add institutions"
        )
    if cfg.num_server_rounds < 1:
        raise _fail(f"num-server-rounds must be >= 1, got {cfg.num_server_rounds}")
    if spec.focal_keys:
        from flower_focal.models.backbones import BACKBONES

        if cfg.backbone not in BACKBONES:
            raise _fail(f"backbone: unknown backbone {cfg.backbone!r}; valid: "
                        f"{', '.join(sorted(BACKBONES))}")
    else:
        from flower_focal.models import MODELS

        if cfg.model not in MODELS:
            raise _fail(f"model: unknown model {cfg.model!r}; valid: {', '.join(sorted(MODELS))}")
    from flower_focal.data.partition import PARTITIONERS
    from flower_focal.training import LR_SCHEDULES, OPTIMIZERS, resolve_device

    if cfg.optimizer not in OPTIMIZERS:
        raise _fail(f"optimizer: unknown optimizer {cfg.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise _fail(f"lr-schedule: unknown schedule {cfg.lr_schedule!r}; valid: {', '.join(LR_SCHEDULES)}")
    if not (math.isfinite(cfg.fedprox_mu) and cfg.fedprox_mu >= 0):
        raise _fail(f"fedprox-mu must be a finite number >= 0 (0 = off), got {cfg.fedprox_mu}")
    if not (math.isfinite(cfg.server_momentum) and cfg.server_momentum >= 0):
        raise _fail(f"server-momentum must be a finite number >= 0, got {cfg.server_momentum}")
    if not (math.isfinite(cfg.server_lr) and cfg.server_lr > 0):
        raise _fail(f"server-lr must be a finite number > 0, got {cfg.server_lr}")
    try:
        check_personalisation(cfg)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if cfg.partitioner not in PARTITIONERS:
        raise _fail(f"partitioner: unknown partitioner {cfg.partitioner!r}; valid: "
                    f"{', '.join(sorted(PARTITIONERS))}")
    try:
        resolve_device(cfg.device)
    except ValueError as exc:
        raise _fail(f"device: {exc}") from None
    if cfg.image_size < 1 or cfg.batch_size < 1:
        raise _fail(f"image-size and batch-size must be >= 1, got {cfg.image_size} and {cfg.batch_size}")


def check_keys(cfg: RunConfig, *, required: bool = False, role: str = "all") -> tuple[str, str]:
    """The HE key directory of a keyed strategy: ``(key_dir, preset)`` or ``("", "")``.

    ``required``: a keyed strategy without ``he-key-dir`` is an error (deployments; a
    simulation makes a temporary key set). ``role`` says which files must be there:
    ``all`` (both), ``server`` (``public.ctx``) or ``institution`` (``secret.ctx``).
    """
    from flower_focal.strategy.specs import strategy_spec

    spec = strategy_spec(cfg.strategy)
    if role not in KEY_ROLES:
        raise _fail(f"key role must be one of {KEY_ROLES}, got {role!r}")
    if not spec.keyed:
        return "", ""
    if not cfg.he_key_dir:
        if required:
            hint = " --preset focal" if spec.focal_keys else ""
            raise _fail(f"he-key-dir: strategy {cfg.strategy!r} needs the institutions' HE key "
                        f"set; make one with `flower-focal keygen --out KEYS{hint}` and set "
                        "he-key-dir=KEYS")
        return "", ""
    from flower_focal.crypto import (
        FOCAL_PRESETS,
        PUBLIC_FILE,
        SECRET_FILE,
        PublicContext,
        SecretContext,
    )

    key_dir = Path(cfg.he_key_dir).expanduser().resolve()
    if not key_dir.is_dir():
        raise _fail(f"he-key-dir: directory not found: {key_dir}")
    wanted = {"all": (PUBLIC_FILE, SECRET_FILE), "server": (PUBLIC_FILE,),
              "institution": (SECRET_FILE,)}[role]
    missing = [name for name in wanted if not (key_dir / name).is_file()]
    if missing:
        raise _fail(f"he-key-dir: {key_dir} has no {' and no '.join(missing)} "
                    f"(found: {', '.join(sorted(p.name for p in key_dir.iterdir())) or 'nothing'})")
    contexts: dict[str, Any] = {}
    for name, cls in ((PUBLIC_FILE, PublicContext), (SECRET_FILE, SecretContext)):
        if name in wanted:
            try:
                contexts[name] = cls.load(key_dir / name)
            except (ValueError, OSError) as exc:
                raise _fail(f"he-key-dir: {exc}") from None
    if len(contexts) == 2 and contexts[PUBLIC_FILE].fingerprint != contexts[SECRET_FILE].fingerprint:
        raise _fail(f"he-key-dir: {key_dir / PUBLIC_FILE} and {key_dir / SECRET_FILE} come from "
                    "two different keygens; use one key set")
    preset = next(iter(contexts.values())).preset.name
    if spec.focal_keys and preset not in FOCAL_PRESETS:
        raise _fail(f"he-key-dir: strategy {cfg.strategy!r} needs keys of a FOCAL preset "
                    f"({', '.join(FOCAL_PRESETS)}), {key_dir} holds preset {preset!r}; make them "
                    "with `flower-focal keygen --preset focal`")
    return str(key_dir), preset


def _pil_reason(path: str) -> str:
    """PIL's own complaint about ``path`` (MONAI's message often hides it)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
    except Exception as exc:  # noqa: BLE001 (any decoder error is the answer)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return ""


def _decode_all(source: Any) -> int:
    """Decode every image file of a file source with the institutions' reader (MONAI, as in
    :func:`flower_focal.data.transforms.load_image`; a few threads) and check each one's
    channel count; the first bad file in data order is reported."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from flower_focal.data import IMAGE
    from flower_focal.data.transforms import ImageDataError, load_image

    if not source.from_files:
        return 0
    paths = [item[IMAGE] for items in (source.train, source.val) for item in items]

    def channels(path: str) -> int | ImageDataError:
        try:
            return int(load_image(path).shape[0])
        except ImageDataError as exc:
            return exc

    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        for path, got in zip(paths, pool.map(channels, paths), strict=True):
            if isinstance(got, ImageDataError):
                reason = _pil_reason(path) or str(got)
                raise _fail(f"data: cannot read image file {path}: {reason}")
            if got != source.in_channels:
                raise _fail(f"data: image file {path} has {got} channel(s), the dataset's first "
                            f"image has {source.in_channels}; convert it")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return len(paths)


def preflight(
    cfg: RunConfig,
    num_institutions: int,
    *,
    decode_images: bool = True,
    require_keys: bool = False,
    key_role: str = "all",
) -> PreflightReport:
    """Check that ``cfg`` can run with ``num_institutions`` institutions; start nothing.

    Checks, cheapest first: settings (strategy via
    :func:`~flower_focal.strategy.specs.strategy_spec`, model or backbone, optimizer,
    partitioner, device, ``min-available-nodes``), HE keys (:func:`check_keys`), the data
    source as the institutions load it (missing file, missing ``.npz`` keys, bad labels), the
    partition (no institution without training data; sizes in the report) and, with
    ``decode_images``, every image file of a folder / CSV source.

    Raises
    ------
    PreflightError
        The first problem found, naming the setting, file or value.
    """
    start = time.time()
    check_settings(cfg, num_institutions)
    key_dir, preset = check_keys(cfg, required=require_keys, role=key_role)
    from flower_focal.data import clear_caches

    quiet = logging.getLogger("LoadImage")  # MONAI logs every reader that fails, at INFO
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        return _check_data(cfg, num_institutions, decode_images, key_dir, preset, start)
    finally:
        quiet.setLevel(level)
        clear_caches()  # this process is not an institution: hold no data, never a stale listing


def _check_data(cfg: RunConfig, num_institutions: int, decode_images: bool, key_dir: str,
                preset: str, start: float) -> PreflightReport:
    from flower_focal.data import describe_partitions, source_info
    from flower_focal.strategy.specs import strategy_spec

    data = cfg.data_path or cfg.dataset
    try:
        source = source_info(cfg)
    except (ValueError, FileNotFoundError) as exc:
        raise _fail(f"data: {exc}") from None
    try:
        parts = describe_partitions(cfg, num_institutions)
    except ValueError as exc:
        raise _fail(f"{num_institutions} institutions on {data}: {exc}") from None
    empty = [p["partition_id"] for p in parts if p["n_train"] == 0]
    if empty:  # the partitioners refuse this already; kept as the contract of preflight
        raise _fail(f"{num_institutions} institutions on {data}: institution(s) {empty} get no "
                    "training data")
    if source.num_classes < 2:
        raise _fail(f"data: {data} has {source.num_classes} class(es); need at least 2")
    decoded = _decode_all(source) if decode_images else 0
    notes = []
    no_val = [p["partition_id"] for p in parts if p["n_val"] == 0]
    if no_val:
        notes.append(f"institution(s) {no_val} get no validation items (local evaluation skipped)")
    return PreflightReport(
        strategy=cfg.strategy, dataset=cfg.dataset, data_path=cfg.data_path,
        num_institutions=num_institutions, num_classes=source.num_classes,
        in_channels=source.in_channels, n_train=len(source.train), n_val=len(source.val),
        institution_train_sizes=[int(p["n_train"]) for p in parts],
        institution_val_sizes=[int(p["n_val"]) for p in parts],
        images_decoded=decoded,
        institution_train_histograms=[[int(c) for c in p["train_histogram"]] for p in parts],
        institution_val_histograms=[[int(c) for c in p["val_histogram"]] for p in parts],
        model=cfg.backbone if strategy_spec(cfg.strategy).focal_keys else cfg.model,
        device=cfg.device, key_dir=key_dir, key_preset=preset,
        seconds=time.time() - start, notes=notes,
    )


__all__ = ["KEY_ROLES", "PreflightError", "PreflightReport", "check_keys", "check_settings",
           "failure_line", "preflight"]
