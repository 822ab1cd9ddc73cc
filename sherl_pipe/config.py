"""The pipeline file: one TOML file with a section per stage, each a frozen, strictly checked dataclass.

Override order (later wins): dataclass defaults < the pipeline file < `--set section.key=value`
< explicit command options. `load_pipeline` applies the first three; the CLI applies its explicit
options with `with_overrides`. Stage one reads `data`, `backbone` and `extract` and ignores the
rest, so one file drives `extract`, `train`, `evaluate` and `run`.

Relative paths in a pipeline file are taken relative to the current directory, like paths given on
the command line. `embedded:NAME` names data or a model that ships in an installed package.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from sherl_pipe.errors import SherlError
from sherl_pipe.methods import DEFAULT as DEFAULT_METHOD
from sherl_pipe.methods import LEGACY_MODES




def _choice(default, *choices):
    return field(default=default, metadata={"choices": (default, *choices)})


def _at_least(default, minimum):
    return field(default=default, metadata={"min": minimum})


def _between(default, minimum, maximum, below_max: bool = False):
    """A number in [minimum, maximum] (or [minimum, maximum) with below_max)."""
    return field(default=default, metadata={"min": minimum, "max": maximum, "below_max": below_max})


def _options():
    """A table of a remote filesystem's options (location.py), which may hold credentials: they are
    used, never written or printed (section_to_dict leaves them out), and never compared."""
    return field(default_factory=dict, hash=False, compare=False, repr=False, metadata={"options": True})


def _column(default):
    """A column name; with data.header = false, its 0-based position (an integer in the file)."""
    return field(default=default, metadata={"column": True})


@dataclass(frozen=True)
class DataConfig:
    """Where the labeled text comes from and how it is cleaned and split."""

    source: str = ""  # one file, split by split_sizes ...
    train: str = ""  # ... or one file per split
    validation: str = ""
    test: str = ""
    format: str = _choice("auto", "csv", "tsv", "jsonl", "parquet")
    encoding: str = "utf-8"
    header: bool = True  # false: CSV/TSV without a header row; columns are named by position (0, 1, ...)
    quoting: str = _choice("auto", "none", "csv")  # auto: CSV quoted as CSV, TSV unquoted (GLUE style)
    text_column: str = _column("text")
    text_pair_column: str = _column("")
    label_column: str = _column("label")
    task_type: str = _choice("classification", "regression")
    label_names: tuple[str, ...] = ()  # fixes label ids; default: sorted distinct labels
    filter_column: str = _column("")
    filter_min: float | None = None
    filter_missing: str = _choice("drop", "keep")
    deduplicate: bool = False
    limit: int = _at_least(0, 0)  # rows kept per file after filtering (0: all)
    split_sizes: tuple[float, ...] = ()  # train, validation, test: counts, or fractions < 1
    validation_size: float = _at_least(0.0, 0.0)  # carved out of data.train: a count, or a fraction < 1
    split_seed: int = 0

    def check(self) -> None:
        from sherl_pipe.data.read import check_encoding

        check_encoding(self.encoding, "data.encoding")
        files = {s: getattr(self, s) for s in ("train", "validation", "test") if getattr(self, s)}
        if self.source and files:
            raise SherlError("data: give either data.source (one file to split) or data.train/validation/test, not both")
        if self.validation_size and (self.source or self.validation or not self.train):
            raise SherlError("data.validation_size: carves a validation split out of data.train, so it needs "
                             "data.train and not with data.validation (or data.source, which data.split_sizes splits)")
        if self.validation_size >= 1 and not float(self.validation_size).is_integer():
            raise SherlError(f"data.validation_size = {self.validation_size}: give a count of rows or a fraction < 1")
        self.check_columns()
        if self.source and len(self.split_sizes) != 3:
            raise SherlError("data.split_sizes: with data.source give three sizes [train, validation, test]")
        if not self.source and self.split_sizes:
            raise SherlError("data.split_sizes: only used with data.source; remove it or use data.source")
        if any(s < 0 for s in self.split_sizes):
            raise SherlError(f"data.split_sizes: sizes must be >= 0, got {list(self.split_sizes)}")
        if self.filter_min is not None and not self.filter_column:
            raise SherlError("data.filter_min: set data.filter_column too")
        if self.task_type == "regression" and self.label_names:
            raise SherlError("data.label_names: only for task_type = 'classification'")

    def check_columns(self) -> None:
        if self.header:
            return
        for key in ("text_column", "text_pair_column", "label_column", "filter_column"):
            value = getattr(self, key)
            if value and not value.isdigit():
                raise SherlError(f"data.{key} = {value!r}: with data.header = false, name columns by 0-based "
                                 f"position (for example {key} = 0)")

    def require_input(self) -> None:
        if not (self.source or self.train or self.validation or self.test):
            raise SherlError("data: no input; set data.source (one file to split) or data.train (and validation/test)")


@dataclass(frozen=True)
class BackboneConfig:
    """The pretrained encoder: a local Hugging Face folder or `embedded:all-MiniLM-L6-v2`."""

    source: str = "embedded:all-MiniLM-L6-v2"
    max_length: int = _at_least(128, 2)
    attn_implementation: str = _choice("sdpa", "eager")
    device: str = _choice("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ExtractConfig:
    """Stage one: which tiers to cache and how to store them."""

    cache: str = "sherl-cache/default"
    late_layers: int = _at_least(1, 0)  # k: the cut is c = L - k; 0 stores every tier h[0..L] (all methods)
    tiers: tuple[int, ...] = ()  # tiers h[t] to store; empty: all of h[0..c]; h[c] is always stored
    dtype: str = _choice("float16", "float32", "int8", "float8")  # storage format (see storage.py)
    precision: str = _choice("fp32", "bf16", "fp16")  # the early layers' computation (autocast); fp16: CUDA only
    # lz4: the whole write path (codec, checksums, files) costs about a tenth of the bare forward pass
    # on 2 CPU cores; zstd stores ~8% less but costs ~30% more time (benchmarks/extract.py).
    # Real-valued fp16 activations barely compress either way.
    codec: str = _choice("blosc-lz4", "blosc-zstd", "zstd", "none")
    clevel: int = _at_least(3, 0)
    chunk_size: int = _at_least(256, 1)  # samples per chunk; one write block = one chunk
    time_chunk: int = _at_least(16, 1)  # positions per chunk along the time axis
    batch_size: int = _at_least(64, 1)  # samples per forward pass
    threads: int = _at_least(2, 1)  # torch threads
    codec_threads: int = _at_least(1, 1)
    splits: tuple[str, ...] = ()  # splits to extract; empty: every split the data section has
    # 1: blocks computed in this process; N > 1: on a local dask cluster of N worker processes
    # (extract --scheduler ADDRESS: on an existing cluster instead)
    workers: int = _at_least(1, 1)
    # object stores: a writer's lease runs out this long after its last renewal (cache/lease.py);
    # shorter lets another extraction take over a crashed one's cache sooner
    lease_seconds: float = _at_least(120.0, 1.0)
    storage_options: dict = _options()  # for a cache at a URL (s3://...): endpoint_url, key, secret, ...


@dataclass(frozen=True)
class TrainConfig:
    """Stage two: the SHERL model trained from the cache."""

    run_dir: str = "sherl-runs/default"
    method: str = field(default=DEFAULT_METHOD, metadata={"registry": True})  # a name in sherl_pipe.methods
    source: str = _choice("cached", "live")  # tiers read from the cache, or the early layers run live
    late_layers: int = _at_least(2, 1)  # k: the last k pretrained layers form the late route (see docs/results/2026-11-24-defaults.md)
    tiers: tuple[int, ...] = ()  # tiers fed to the consolidation; empty: every cached tier up to the anchor
    late_tuning: str = _choice("frozen", "norm-bias", "lora", "full")
    projection: str = _choice("gated-mlp", "linear-ln")
    # how the consolidation turns tier scores into weights (consolidation.TIER_SCORES; relu: the paper's,
    # which left most runs' tiers unused; see docs/methods.md, The consolidation's tier score)
    tier_score: str = _choice("softmax-normed", "relu", "softplus", "softmax", "relu-normed", "softplus-normed")
    # how the consolidation starts (consolidation.ANCHOR_RESIDUALS): shut, the paper's (its output
    # replaces h[c]); open, h[c] passed on and the module's own output at zero (see docs/methods.md)
    anchor_residual: str = _choice("shut", "open")
    reduction: int = _at_least(0, 0)  # width D / r of the method's modules; 0: the method's (sherl, lst 8; unipt 2)
    pooling: str = _choice("auto", "cls-pooler", "cls", "mean")
    dropout: float = _between(0.1, 0.0, 1.0, below_max=True)
    epochs: int = _at_least(3, 0)
    max_steps: int = _at_least(0, 0)  # > 0: stop after this many optimizer steps
    # > 0: stop once training (its evaluations included) would pass this many seconds; the epoch
    # cut short is evaluated, and the time its evaluation takes is kept in reserve
    max_seconds: float = _at_least(0.0, 0.0)
    batch_size: int = _at_least(32, 1)
    grad_accum: int = _at_least(1, 1)
    lr: float = _at_least(0.0, 0.0)  # new modules and head; 0: 1e-3
    lr_late: float = _at_least(0.0, 0.0)  # pretrained weights being tuned; 0: the late_tuning mode's default
    weight_decay: float = _at_least(0.01, 0.0)  # pretrained weights (not their norms and biases)
    weight_decay_new: float = _at_least(0.0, 0.0)  # the new modules (consolidation, head, LoRA)
    warmup_ratio: float = _between(0.06, 0.0, 1.0)
    grad_clip: float = _at_least(1.0, 0.0)
    lora_rank: int = _at_least(8, 1)
    lora_alpha: float = _at_least(16.0, 0.0)
    eval_split: str = "validation"  # "" to skip per-epoch evaluation
    metric: str = ""  # picks the best epoch and drives early stopping; "": accuracy or pearson (metrics.selection)
    early_stopping: int = _at_least(0, 0)  # epochs without improvement before stopping; 0: never
    save_every: int = _at_least(0, 0)  # optimizer steps between resumable checkpoints; 0: by time only
    save_minutes: float = _at_least(5.0, 0.0)  # minutes between resumable checkpoints within an epoch; 0: off
    log_every: int = _at_least(10, 1)  # optimizer steps between train-loss records in metrics.jsonl
    batching: str = _choice("bucketed", "shuffled")  # see training/batches.py and docs/training.md
    buffer_chunks: int = _at_least(4, 1)  # bucketed: chunks shuffled together by the loader ...
    buffer_mb: int = _at_least(32, 1)  # ... as long as their decoded tiers fit this (always >= 1 chunk)
    preload: bool = False  # read the whole train split into memory first (small caches only)
    compile: bool = False  # torch.compile the consolidation for training steps (eager if that fails)
    precision: str = _choice("auto", "fp32", "bf16")  # stage two's autocast; auto: bf16 on CUDA, fp32 on CPU
    seed: int = 0
    threads: int = _at_least(2, 1)
    device: str = _choice("auto", "cpu", "cuda")
    storage_options: dict = _options()  # reading the cache: over extract.storage_options, key by key


@dataclass(frozen=True)
class EvaluateConfig:
    split: str = "test"
    checkpoint: str = _choice("best", "last")
    batch_size: int = _at_least(128, 1)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "backbone": BackboneConfig,
    "extract": ExtractConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
}


@dataclass(frozen=True)
class Pipeline:
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    extract: ExtractConfig = ExtractConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    origin: str = "<defaults>"
    # The file's [sweep] table as written, and the `--set sweep.*` overrides (item, key, value) in
    # order: only `sherl-pipe sweep` reads them (sweep/config.py layers them with a --sweep FILE).
    sweep: dict = field(default_factory=dict, compare=False)
    sweep_sets: tuple = field(default=(), compare=False)

    def to_dict(self, secrets: bool = False) -> dict:
        """Every section as written and printed; storage credentials only with SECRETS=True (an
        in-memory hand-over, never a file)."""
        return {name: section_to_dict(getattr(self, name), secrets) for name in SECTIONS}

    @classmethod
    def from_dict(cls, d: dict, origin: str) -> "Pipeline":
        """A pipeline from its dict form (config.json, a sweep trial), checked like a file."""
        return cls(**{name: build_section(name, d.get(name, {}), origin) for name in SECTIONS}, origin=origin)

    def with_overrides(self, section: str, **values) -> "Pipeline":
        """Explicit command options: the last word in the override order. None means 'not given'."""
        given = {k: v for k, v in values.items() if v is not None}
        if not given:
            return self
        if section == "train" and "mode" in given:  # from before methods existed: what it meant
            given = translate_mode(given, "command option")
        merged = {**section_to_dict(getattr(self, section), secrets=True), **given}
        return dataclasses.replace(self, **{section: build_section(section, merged, "command option")})


def absolute_paths(pipeline: Pipeline) -> Pipeline:
    """The pipeline with its file and folder paths absolute (`embedded:` names and empty ones kept):
    what a process elsewhere (a sweep trial on a dask worker, whose directory is not this one) must
    be given so that it reads the same files."""
    from sherl_pipe.cache.location import is_url

    def absolute(path: str) -> str:
        return path if not path or path.startswith("embedded:") or is_url(path) else str(Path(path).absolute())

    data = {k: absolute(getattr(pipeline.data, k)) for k in ("source", "train", "validation", "test")}
    return dataclasses.replace(
        pipeline, data=dataclasses.replace(pipeline.data, **data),
        backbone=dataclasses.replace(pipeline.backbone, source=absolute(pipeline.backbone.source)),
        extract=dataclasses.replace(pipeline.extract, cache=absolute(pipeline.extract.cache)),
        train=dataclasses.replace(pipeline.train, run_dir=absolute(pipeline.train.run_dir)))


# train keys whose value before they existed differs from today's default: a run or sweep saved
# by an earlier sherl-pipe had this value (it trained with the paper's tier score).
TRAIN_BEFORE_THEY_EXISTED = {"tier_score": "relu"}


def upgrade_saved(saved: dict) -> dict:
    """A pipeline dict saved by an earlier sherl-pipe (a run's state, a sweep's signature) with
    the keys it lacked: at their value before they existed (TRAIN_BEFORE_THEY_EXISTED), else at
    today's default, which is what that version ran with."""
    defaults = Pipeline().to_dict()
    saved = dict(saved)
    if "mode" in saved.get("train", {}):
        saved["train"] = translate_mode(saved["train"], "a saved pipeline")
    out = {name: {**defaults[name], **(TRAIN_BEFORE_THEY_EXISTED if name == "train" else {}), **saved.get(name, {})}
           for name in SECTIONS if name in saved}
    return {**saved, **out}


def section_to_dict(section, secrets: bool = False) -> dict:
    """A section as a dict, as it is written and printed: storage options without their
    credentials (SECRETS=True keeps them, for handing a pipeline to another process in memory)."""
    from sherl_pipe.cache.location import public_options

    out = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if f.metadata.get("options"):
            value = dict(value) if secrets else public_options(value)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def packaged_pipelines() -> list[str]:
    root = resources.files("sherl_pipe") / "pipelines"
    return sorted(p.name[: -len(".toml")] for p in root.iterdir() if p.name.endswith(".toml"))


def load_pipeline(spec: str | None, overrides: tuple[str, ...] | list[str] = ()) -> Pipeline:
    """Read a pipeline file (a path, or the name of a packaged pipeline) and apply `--set` overrides."""
    raw, origin = ({}, "<defaults>") if spec is None else _read_file(spec)
    if not isinstance(raw, dict):
        raise SherlError(f"{origin}: expected TOML tables")
    unknown = set(raw) - set(SECTIONS) - {"sweep"}
    if unknown:
        raise SherlError(f"{origin}: unknown section(s) {sorted(unknown)}; known: {sorted(SECTIONS) + ['sweep']}")
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    if isinstance(raw.get("train"), dict) and "mode" in raw["train"]:  # the file's own, before --set applies
        raw["train"] = translate_mode(raw["train"], origin)
    sweep_sets = []
    for section, key, value, item in _expanded(overrides):
        if section == "sweep":
            sweep_sets.append((item, key, value))
        else:
            raw[section] = _set_key(raw.get(section, {}) if isinstance(raw.get(section), dict) else {}, key, value)
    sections = {}
    for name in [*SECTIONS, "sweep"]:
        body = raw.get(name, {})
        if not isinstance(body, dict):
            raise SherlError(f"{origin}: [{name}] must be a table of key = value")
        sections[name] = body if name == "sweep" else build_section(name, body, origin)
    return Pipeline(**sections, origin=origin, sweep_sets=tuple(sweep_sets))


def apply_overrides(pipeline: Pipeline, overrides) -> Pipeline:
    """`--set section.key=value` overrides applied to a pipeline already loaded."""
    for section, key, value, item in _expanded(overrides):
        if section == "sweep":
            pipeline = dataclasses.replace(pipeline, sweep_sets=(*pipeline.sweep_sets, (item, key, value)))
            continue
        merged = _set_key(section_to_dict(getattr(pipeline, section), secrets=True), key, value)
        pipeline = dataclasses.replace(pipeline, **{section: build_section(section, merged, f"--set {item}")})
    return pipeline


def _read_file(spec: str) -> tuple[dict, str]:
    path = Path(spec)
    if not path.exists() and "/" not in spec and not spec.endswith(".toml"):
        if spec in packaged_pipelines():
            text = (resources.files("sherl_pipe") / "pipelines" / f"{spec}.toml").read_text("utf-8")
            return _parse_toml(text, f"packaged pipeline '{spec}'"), f"packaged:{spec}"
        raise SherlError(
            f"pipeline '{spec}': no such file and no packaged pipeline of that name "
            f"(packaged: {', '.join(packaged_pipelines())})"
        )
    if not path.is_file():
        raise SherlError(f"pipeline file {spec}: not found; give the path of a .toml pipeline file")
    return _parse_toml(path.read_text("utf-8"), str(path)), str(path)


def _parse_toml(text: str, where: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SherlError(f"{where}: not valid TOML ({exc})") from None


def _expanded(overrides):
    """(section, key, value, item) of each --set; train.mode (from before methods existed) becomes
    train.method and train.source."""
    for item in overrides:
        section, key, value = _parse_set(item)
        if (section, key) == ("train", "mode"):
            if value not in LEGACY_MODES:
                raise SherlError(f"--set {item!r}: train.mode is now train.method and train.source; one of "
                                 f"{', '.join(map(repr, LEGACY_MODES))} is translated")
            yield from (("train", "method", LEGACY_MODES[value][0], item), ("train", "source", LEGACY_MODES[value][1], item))
        else:
            yield section, key, value, item


def _parse_set(item: str) -> tuple[str, str, object]:
    name, sep, text = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        raise SherlError(f"--set {item!r}: expected section.key=value, for example --set extract.dtype=float32")
    if section not in SECTIONS and section != "sweep":
        raise SherlError(f"--set {item!r}: unknown section '{section}'; known: {sorted(SECTIONS) + ['sweep']}")
    key, _, sub = key.strip().partition(".")
    fields = [f.name for f in dataclasses.fields(SECTIONS[section])] if section in SECTIONS else None
    if fields is not None and section == "train":
        fields.append("mode")  # before methods existed (translate_mode)
    if fields is not None and key not in fields:  # named here: the file it is merged into is not at fault
        raise SherlError(f"--set {item!r}: unknown key '{section}.{key}'; known keys of [{section}]: {', '.join(fields)}")
    try:  # a TOML value (number, bool, array, quoted string) ...
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:  # ... or else a bare string
        value = text.strip()
    if section == "sweep":
        return section, f"{key}.{sub}" if sub else key, value
    if sub:  # one key of a table: --set extract.storage_options.endpoint_url=http://...
        if not any(f.name == key and f.metadata.get("options") for f in dataclasses.fields(SECTIONS[section])):
            raise SherlError(f"--set {item!r}: {section}.{key} is not a table; give --set {section}.{key}=VALUE")
        value = _OneKey(tuple(sub.split(".")), value)
    return section, key, value


@dataclass(frozen=True)
class _OneKey:
    """`--set section.table.a.b=value`: one key of a table, merged into the table below it."""

    path: tuple
    value: object

    def merged(self, table) -> dict:
        table = dict(table) if isinstance(table, dict) else {}
        head, rest = self.path[0], self.path[1:]
        table[head] = _OneKey(rest, self.value).merged(table.get(head)) if rest else self.value
        return table


def _set_key(table: dict, key: str, value) -> dict:
    """TABLE with KEY set to VALUE (or, for one key of a table-valued key, merged into it)."""
    return {**table, key: value.merged(table.get(key)) if isinstance(value, _OneKey) else value}


def build_section(name: str, values: dict, origin: str, cls: type | None = None):
    """A section's dataclass from its key = value table, every value checked."""
    cls = cls or SECTIONS[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    if cls is TrainConfig and "mode" in values:
        values = translate_mode(values, origin)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SherlError(f"{origin}: unknown key '{name}.{unknown[0]}'; known keys of [{name}]: {', '.join(fields)}")
    checked = {}
    for key, value in values.items():
        where = f"{origin}: {name}.{key}"
        meta = fields[key].metadata
        if meta.get("column") and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            value = str(value)  # a column's position in a file without a header
        checked[key] = _check_value(_coerce(value, hints[key], where), meta, where)
    section = cls(**checked)
    if hasattr(section, "check"):
        try:
            section.check()
        except SherlError as exc:
            raise SherlError(f"{origin}: {exc}") from None
    return section


def translate_mode(values: dict, origin: str) -> dict:
    """train.mode, as pipeline files, run folders and sweeps from before methods existed have it:
    cached -> method sherl from the cache; live -> sherl live; full-finetune -> method full-finetune."""
    values = dict(values)
    mode = values.pop("mode")
    if mode not in LEGACY_MODES:
        raise SherlError(f"{origin}: train.mode = {mode!r} is not one of {', '.join(map(repr, LEGACY_MODES))}; "
                         f"train.mode is now train.method (sherl, full-finetune, ...) and train.source (cached, live)")
    method, source = LEGACY_MODES[mode]
    if values.get("method", method) != method or values.get("source", source) != source:
        raise SherlError(f"{origin}: train.mode = {mode!r} contradicts train.method / train.source; write only "
                         f"method = {method!r} and source = {source!r}")
    return {**values, "method": method, "source": source}


def _check_value(value, meta, where: str):
    if meta.get("registry"):
        from sherl_pipe.methods import get_method

        get_method(value, where)  # refused with the known names
    if "choices" in meta and value not in meta["choices"]:
        raise SherlError(f"{where} = {value!r} is not one of {', '.join(map(repr, meta['choices']))}")
    if "min" in meta and value < meta["min"]:
        raise SherlError(f"{where} = {value!r} must be >= {meta['min']}")
    if "max" in meta and (value >= meta["max"] if meta["below_max"] else value > meta["max"]):
        raise SherlError(f"{where} = {value!r} must be {'<' if meta['below_max'] else '<='} {meta['max']}")
    return value


def _coerce(value, hint, where: str):
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):  # `float | None`
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(value, inner, where)
    if origin is tuple:
        (inner, _) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise SherlError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise SherlError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SherlError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SherlError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise SherlError(f"{where}: expected a string, got {value!r}")
        return value
    if hint is dict:
        if not isinstance(value, dict):
            raise SherlError(f"{where}: expected a table, for example {{endpoint_url = \"http://127.0.0.1:9000\"}}, "
                             f"got a {type(value).__name__}")
        return dict(value)
    raise TypeError(f"unsupported config type {hint}")  # a bug in this module, not user input


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


def to_toml(pipeline: Pipeline, header: str = "") -> str:
    """The pipeline as a pipeline file (every key written out; unset optional keys left out)."""
    lines = [f"# {line}" for line in header.splitlines()]
    for name, values in pipeline.to_dict().items():
        lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines).lstrip("\n") + "\n"


def dumps(pipeline: Pipeline) -> str:
    """The resolved configuration as printed and saved with every output."""
    return json.dumps(pipeline.to_dict(), indent=2, sort_keys=False)
