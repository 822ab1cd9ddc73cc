"""The names of a cache's splits: the labeled ones a data section describes, and data.unlabeled's."""

SPLITS = ("train", "validation", "test")
UNLABELED = "unlabeled"  # data.unlabeled's split: text only, its labels a placeholder (NO_LABEL)
NO_LABEL = -1  # an unlabeled row's label id (classification); NaN for regression

# how a cache comes to hold a split, for a message about one it lacks
HOW_TO_GET = {UNLABELED: "set data.unlabeled (a file of text without labels) and extract the cache again (with "
                         "--overwrite: its data changes)"}


def how_to_get(split: str) -> str:
    return HOW_TO_GET.get(split, "extract it into the cache")
