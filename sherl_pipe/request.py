"""What a pipeline asks of a cache, read without the model's weights: the data (fingerprinted),
the backbone's config and tokenizer, and the storage settings. `extract` builds the manifest from
it; `train` compares it with the cache it is given, so a stale cache is refused, not trained on."""

from __future__ import annotations

from dataclasses import dataclass

from sherl_pipe.backbone import describe_backbone, load_config, load_tokenizer, position_limit, tokenizer_identity
from sherl_pipe.cache import Cache
from sherl_pipe.cache.manifest import describe_request, stale_fields
from sherl_pipe.config import Pipeline, TrainConfig
from sherl_pipe.data import Dataset, load_dataset
from sherl_pipe.splits import UNLABELED, how_to_get
from sherl_pipe.errors import SherlError
from sherl_pipe.resources import resolve_model
from sherl_pipe.cache.location import pipeline_location
from sherl_pipe.cache.store import is_sherl_cache


@dataclass
class Request:
    dataset: Dataset
    folder: object
    config: object
    tokenizer: object
    described: dict


def read_request(pipeline: Pipeline) -> Request:
    """The data first (its errors come before any model is loaded), then the backbone's config and
    tokenizer (cheap: no weights)."""
    dataset = load_dataset(pipeline.data, pipeline.extract.splits)
    folder = resolve_model(pipeline.backbone.source)
    config = load_config(folder, pipeline.backbone.attn_implementation)
    tokenizer = load_tokenizer(folder)
    limit = position_limit(config, tokenizer)
    if pipeline.backbone.max_length > limit:
        raise SherlError(f"backbone.max_length = {pipeline.backbone.max_length} is more than the model's "
                         f"{limit} positions; set backbone.max_length to at most {limit}")
    described = describe_request(pipeline, describe_backbone(config, folder), tokenizer_identity(folder, tokenizer),
                                 dataset)
    return Request(dataset, folder, config, tokenizer, described)


def check_cache_matches(cache: Cache, pipeline: Pipeline) -> None:
    """Refuse a cache made from other data, another backbone config or tokenizer, or other storage
    settings than the pipeline describes (the same matching rules as extract)."""
    diffs = stale_fields(cache.manifest, read_request(pipeline).described)
    if diffs:
        shown = "; ".join(map(str, diffs[:6])) + ("; ..." if len(diffs) > 6 else "")
        raise SherlError(f"cache {cache.path}: was made for other data or settings than this pipeline describes "
                         f"({shown}); rerun `sherl-pipe extract` (or `sherl-pipe run`) to rebuild it, or point "
                         f"extract.cache at the cache made for this pipeline")


def cache_ready(pipeline: Pipeline) -> bool:
    """Whether the pipeline's cache exists, is complete and matches it (checked without the model's
    weights): commands that only read the cache (sweep) then skip the extract step and its model load."""

    loc = pipeline_location(pipeline, training=True)
    try:
        if not is_sherl_cache(loc):
            return False
        cache = Cache(loc)
        wanted = list(pipeline.extract.splits) or cache.splits
        if not all(s in cache.splits for s in wanted):
            return False
        for split in cache.splits:
            cache.require_complete(split)
        check_cache_matches(cache, pipeline)
    except SherlError:
        return False
    return True


def check_splits(cfg: TrainConfig, splits: list[str], cache: str) -> None:
    """The splits training reads (train, and train.eval_split when set) are among the cache's."""
    if "train" not in splits:
        raise SherlError(f"{cache}: has no 'train' split (has: {', '.join(splits)})")
    if cfg.eval_split == UNLABELED:
        raise SherlError(f"train.eval_split = '{UNLABELED}': that split (data.unlabeled) has no labels to evaluate "
                         f"epochs on; set train.eval_split to a labeled split (validation)")
    if cfg.eval_split and cfg.eval_split not in splits:
        raise SherlError(f"train.eval_split = '{cfg.eval_split}': {cache} has no such split (has: "
                         f"{', '.join(splits)}); set train.eval_split to one of them, or to \"\" to train "
                         f"without evaluation (no best checkpoint, no early stopping)")


def check_phase_splits(spec, cfg: TrainConfig, splits: list[str], cache: str) -> None:
    """The splits the method's phases train on (Method.phases: a warm-up's 'unlabeled') are among the cache's."""
    for phase in spec.plugin.phases(spec, cfg):
        if phase.split not in splits:
            raise SherlError(f"train.method = {spec.method!r}: its phase {phase.name!r} trains on the split "
                             f"{phase.split!r}, which {cache} does not hold; {how_to_get(phase.split)}")


def check_test_rows_do_not_choose(pipeline: Pipeline, command: str, chooses: str) -> None:
    """COMMAND picks CHOOSES on train.eval_split, and evaluate.split is the split its results are
    judged on: one split for both would let the test rows choose what they are then judged by."""
    split = pipeline.train.eval_split
    if split and split == pipeline.evaluate.split:
        raise SherlError(f"train.eval_split = '{split}' and evaluate.split = '{split}' are the same split: {command} "
                         f"would let the test rows choose {chooses}; set train.eval_split to a validation split "
                         f"(or data.validation_size to carve one out of data.train)")
