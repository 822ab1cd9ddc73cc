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
import functools
import json
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from sherl_pipe.errors import SherlError
from sherl_pipe.fields import as_written, at_least, between, checked, choice, column, options
from sherl_pipe.methods import DEFAULT as DEFAULT_METHOD
from sherl_pipe.methods import LEGACY_MODES, REGISTRY, check_settings, get_method, option_owners, settings_as_written
from sherl_pipe.cache.location import is_url, public_options




@dataclass(frozen=True)
class DataConfig:
    """Where the labeled text comes from and how it is cleaned and split."""

    source: str = ""  # one file, split by split_sizes ...
    train: str = ""  # ... or one file per split
    validation: str = ""
    test: str = ""
    # rows of text (or text pairs) without labels: the cache's 'unlabeled' split, which a method's
    # self-supervised phase trains on (train.pretrain_epochs); the same columns and format
    unlabeled: str = ""
    format: str = choice("auto", "csv", "tsv", "jsonl", "parquet")
    encoding: str = "utf-8"
    header: bool = True  # false: CSV/TSV without a header row; columns are named by position (0, 1, ...)
    quoting: str = choice("auto", "none", "csv")  # auto: CSV quoted as CSV, TSV unquoted (GLUE style)
    text_column: str = column("text")
    text_pair_column: str = column("")
    label_column: str = column("label")
    task_type: str = choice("classification", "regression")
    label_names: tuple[str, ...] = ()  # fixes label ids; default: sorted distinct labels
    filter_column: str = column("")
    filter_min: float | None = None
    filter_missing: str = choice("drop", "keep")
    deduplicate: bool = False
    limit: int = at_least(0, 0)  # rows kept per file after filtering (0: all)
    split_sizes: tuple[float, ...] = ()  # train, validation, test: counts, or fractions < 1
    validation_size: float = at_least(0.0, 0.0)  # carved out of data.train: a count, or a fraction < 1
    split_seed: int = 0

    def check(self) -> None:
        from sherl_pipe.data.read import check_encoding  # data/ imports this module (DataConfig): a cycle

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
    max_length: int = at_least(128, 2)
    attn_implementation: str = choice("sdpa", "eager")
    device: str = choice("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ExtractConfig:
    """Stage one: which tiers to cache and how to store them."""

    cache: str = "sherl-cache/default"
    late_layers: int = at_least(1, 0)  # k: the cut is c = L - k; 0 stores every tier h[0..L] (all methods)
    tiers: tuple[int, ...] = ()  # tiers h[t] to store; empty: all of h[0..c]; h[c] is always stored
    dtype: str = choice("float16", "float32", "int8", "float8")  # storage format (see formats.py)
    precision: str = choice("fp32", "bf16", "fp16")  # the early layers' computation (autocast); fp16: CUDA only
    # lz4: the whole write path (codec, checksums, files) costs about a tenth of the bare forward pass
    # on 2 CPU cores; zstd stores ~8% less but costs ~30% more time (benchmarks/extract.py).
    # Real-valued fp16 activations barely compress either way.
    codec: str = choice("blosc-lz4", "blosc-zstd", "zstd", "none")
    clevel: int = at_least(3, 0)
    chunk_size: int = at_least(256, 1)  # samples per chunk; one write block = one chunk
    time_chunk: int = at_least(16, 1)  # positions per chunk along the time axis
    batch_size: int = at_least(64, 1)  # samples per forward pass
    threads: int = at_least(2, 1)  # torch threads
    codec_threads: int = at_least(1, 1)
    splits: tuple[str, ...] = ()  # splits to extract; empty: every split the data section has
    # 1: blocks computed in this process; N > 1: on a local dask cluster of N worker processes
    # (extract --scheduler ADDRESS: on an existing cluster instead)
    workers: int = at_least(1, 1)
    # object stores: a writer's lease runs out this long after its last renewal (cache/lease.py);
    # shorter lets another extraction take over a crashed one's cache sooner
    lease_seconds: float = at_least(120.0, 1.0)
    storage_options: dict = options()  # for a cache at a URL (s3://...): endpoint_url, key, secret, ...


@dataclass(frozen=True)
class TrainConfig:
    """Stage two: the settings every training method shares. A method's own settings (its Options,
    sherl_pipe/methods) are keys of [train] (`flat`: each applies to every method that has it) or
    its [train.<method>] table (`tables`); `options` is the chosen method's, resolved."""

    run_dir: str = "sherl-runs/default"
    method: str = field(default=DEFAULT_METHOD, metadata={"registry": True})  # a name in sherl_pipe.methods
    source: str = choice("cached", "live")  # tiers read from the cache, or the early layers run live
    pooling: str = choice("auto", "cls-pooler", "cls", "mean")
    dropout: float = between(0.1, 0.0, 1.0, below_max=True)
    epochs: int = at_least(3, 0)
    # > 0: that many epochs of self-supervised warm-up (Barlow Twins) on the cache's 'unlabeled'
    # split (data.unlabeled) before the task's epochs; methods with features to warm up only
    pretrain_epochs: int = at_least(0, 0)
    max_steps: int = at_least(0, 0)  # > 0: stop after this many optimizer steps
    # > 0: stop once training (its evaluations included) would pass this many seconds; the epoch
    # cut short is evaluated, and the time its evaluation takes is kept in reserve
    max_seconds: float = at_least(0.0, 0.0)
    batch_size: int = at_least(32, 1)
    grad_accum: int = at_least(1, 1)
    lr: float = at_least(0.0, 0.0)  # new modules and head; 0: the method's (Method.lr)
    lr_late: float = at_least(0.0, 0.0)  # pretrained weights it tunes; 0: the method's (Method.lr_pretrained)
    weight_decay: float = at_least(0.01, 0.0)  # pretrained weights (not their norms and biases)
    weight_decay_new: float = at_least(0.0, 0.0)  # the new modules (consolidation, head, LoRA)
    warmup_ratio: float = between(0.06, 0.0, 1.0)
    grad_clip: float = at_least(1.0, 0.0)
    eval_split: str = "validation"  # "" to skip per-epoch evaluation
    metric: str = ""  # picks the best epoch and drives early stopping; "": accuracy or pearson (metrics.selection)
    early_stopping: int = at_least(0, 0)  # epochs without improvement before stopping; 0: never
    save_every: int = at_least(0, 0)  # optimizer steps between resumable checkpoints; 0: by time only
    save_minutes: float = at_least(5.0, 0.0)  # minutes between resumable checkpoints within an epoch; 0: off
    log_every: int = at_least(10, 1)  # optimizer steps between train-loss records in metrics.jsonl
    batching: str = choice("bucketed", "shuffled")  # see training/batches.py and docs/training.md
    buffer_chunks: int = at_least(4, 1)  # bucketed: chunks shuffled together by the loader ...
    buffer_mb: int = at_least(32, 1)  # ... as long as their decoded tiers fit this (always >= 1 chunk)
    preload: bool = False  # read the whole train split into memory first (small caches only)
    compile: bool = False  # torch.compile the consolidation for training steps (eager if that fails)
    precision: str = choice("auto", "fp32", "bf16")  # stage two's autocast; auto: bf16 on CUDA, fp32 on CPU
    seed: int = 0
    threads: int = at_least(2, 1)
    device: str = choice("auto", "cpu", "cuda")
    storage_options: dict = options()  # reading the cache: over extract.storage_options, key by key
    flat: dict = field(default_factory=dict, hash=False, repr=False, metadata={"method_settings": True})
    tables: dict = field(default_factory=dict, hash=False, repr=False, metadata={"method_settings": True})

    @functools.cached_property
    def plugin(self):
        """The method itself (sherl_pipe.methods), looked up once."""
        return get_method(self.method)

    @functools.cached_property
    def options(self):
        """The method's own settings: its [train] keys under its [train.<method>] table."""
        return self.plugin.options(self.flat, self.tables.get(self.method, {}), "train")

    def __getattr__(self, name: str):
        """A method setting read as train.KEY (train.late_layers): the chosen method's value."""
        if name.startswith("__") or name in ("flat", "tables", "method", "options", "plugin"):
            raise AttributeError(name)
        options = self.options
        if name in options.keys():
            return getattr(options, name)
        raise AttributeError(f"train has no setting {name!r} for method {self.method!r}")


@dataclass(frozen=True)
class EvaluateConfig:
    split: str = "test"
    checkpoint: str = choice("best", "last")
    batch_size: int = at_least(128, 1)


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

    def to_dict(self, secrets: bool = False, given: bool = False) -> dict:
        """Every section as written and printed; storage credentials only with SECRETS=True (an
        in-memory hand-over, never a file); the methods' settings only as given with GIVEN=True
        (a hand-over to be read again: written out, their defaults would read as given)."""
        return {name: section_to_dict(getattr(self, name), secrets, given) for name in SECTIONS}

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
        merged = {**section_to_dict(getattr(self, section), secrets=True, given=True), **given}
        if section == "train":
            merged = later_keys_win(merged, given)
        return dataclasses.replace(self, **{section: build_section(section, merged, "command option")})


def absolute_paths(pipeline: Pipeline) -> Pipeline:
    """The pipeline with its file and folder paths absolute (`embedded:` names and empty ones kept):
    what a process elsewhere (a sweep trial on a dask worker, whose directory is not this one) must
    be given so that it reads the same files."""

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


def section_to_dict(section, secrets: bool = False, given: bool = False) -> dict:
    """A section as a dict, as it is written and printed: storage options without their
    credentials (SECRETS=True keeps them, for handing a pipeline to another process in memory);
    a train section's method settings with their defaults, or only as given (GIVEN=True)."""

    out = {}
    for f in dataclasses.fields(section):
        if f.metadata.get("method_settings"):
            continue
        value = getattr(section, f.name)
        if f.metadata.get("options"):
            value = dict(value) if secrets else public_options(value)
        out[f.name] = as_written(value)
    if isinstance(section, TrainConfig):
        out.update({"flat": dict(section.flat), "tables": {m: dict(t) for m, t in section.tables.items()}} if given
                   else settings_as_written(section.flat, section.tables))
    return out


def later_keys_win(train: dict, keys) -> dict:
    """A [train] table with KEYS set by a later layer (--set, a command option, a swept value):
    those keys leave every method's table below, so that the later value is the one trained with."""
    out = dict(train)
    for name in [k for k, v in out.items() if k in REGISTRY and isinstance(v, dict)]:
        out[name] = {k: v for k, v in out[name].items() if k not in keys}
    if isinstance(out.get("tables"), dict):
        out["tables"] = {m: {k: v for k, v in t.items() if k not in keys} for m, t in out["tables"].items()}
    if isinstance(out.get("flat"), dict):
        out["flat"] = {k: v for k, v in out["flat"].items() if k not in keys}
    return out


def laid_over(train: dict, values: dict) -> dict:
    """A [train] table with VALUES set over it by a later layer (a trial's swept values, a compare
    row's keys): they win over the table's own keys and its method tables (later_keys_win)."""
    return later_keys_win({**train, **values}, list(values))


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
            if section == "train":
                raw[section] = later_keys_win(raw[section], [key])
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
        merged = _set_key(section_to_dict(getattr(pipeline, section), secrets=True, given=True), key, value)
        if section == "train":
            merged = later_keys_win(merged, [key])
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
    if section == "train":
        fields = train_keys() + ["mode"]  # mode: before methods existed (translate_mode)
        if key in REGISTRY and sub:  # one key of a method's own table: --set train.sherl.late_layers=4
            fields.append(key)
    if fields is not None and key not in fields:  # named here: the file it is merged into is not at fault
        raise SherlError(f"--set {item!r}: unknown key '{section}.{key}'; known keys of [{section}]: {', '.join(fields)}")
    try:  # a TOML value (number, bool, array, quoted string) ...
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:  # ... or else a bare string
        value = text.strip()
    if section == "sweep":
        return section, f"{key}.{sub}" if sub else key, value
    if sub:  # one key of a table: --set extract.storage_options.endpoint_url=http://...
        method_table = section == "train" and key in REGISTRY
        if not method_table and not any(f.name == key and f.metadata.get("options")
                                        for f in dataclasses.fields(SECTIONS[section])):
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
    if cls is TrainConfig:
        values = _method_settings_apart(values, origin)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SherlError(f"{origin}: unknown key '{name}.{unknown[0]}'; known keys of [{name}]: {', '.join(fields)}")
    checked_values = {}
    for key, value in values.items():
        where = f"{origin}: {name}.{key}"
        if fields[key].metadata.get("registry"):
            get_method(value, where)  # refused with the known names
        checked_values[key] = checked(value, fields[key], hints[key], where)
    section = cls(**checked_values)
    try:
        if hasattr(section, "check"):
            section.check()
        if cls is TrainConfig:
            section.options  # the chosen method's settings, as it resolves them
    except SherlError as exc:
        raise SherlError(f"{origin}: {exc}") from None
    return section


def train_keys() -> list[str]:
    """The keys [train] takes: the shared settings, then every method's own (sherl_pipe.methods)."""
    shared = [f.name for f in dataclasses.fields(TrainConfig) if not f.metadata.get("method_settings")]
    return shared + [k for k in option_owners() if k not in shared]


def _method_settings_apart(values: dict, origin: str) -> dict:
    """A [train] table with the methods' settings gathered into `flat` (keys a method has) and
    `tables` ([train.<method>]), each checked by the methods that have it."""
    if "mode" in values:
        values = translate_mode(values, origin)
    owners = option_owners()
    handed = {k: values[k] for k in ("flat", "tables") if k in values}  # a pipeline handed over as given
    if not all(isinstance(v, dict) for v in handed.values()) or not set(handed.get("flat", {})) <= set(owners) or \
            not all(m in REGISTRY and isinstance(t, dict) for m, t in handed.get("tables", {}).items()):
        raise SherlError(f"{origin}: unknown key 'train.{next(iter(handed))}'; write a method's settings as keys "
                         f"of [train] or in a [train.METHOD] table")
    shared = {k: v for k, v in values.items()
              if k not in owners and k not in handed and not (k in REGISTRY and isinstance(v, dict))}
    unknown = sorted(set(shared) - set(train_keys()))
    if unknown:
        raise SherlError(f"{origin}: unknown key 'train.{unknown[0]}'; known keys of [train]: "
                         f"{', '.join(train_keys())}, and a table [train.METHOD] of a method's own "
                         f"({', '.join(REGISTRY)})")
    flat = {**values.get("flat", {}), **{k: v for k, v in values.items() if k in owners}}
    tables = {**values.get("tables", {}), **{k: v for k, v in values.items() if k in REGISTRY and isinstance(v, dict)}}
    check_settings(flat, tables, f"{origin}: train")
    return {**shared, "flat": flat, "tables": tables}


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
