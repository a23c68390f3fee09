"""The training job reads and tokenizes its corpus with Ray Data, on the driver's Ray cluster:
one read of every file (order preserved), then `tokenize_records` over batches in parallel."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from model.tokenizer import Tokenizer
from pipeline.training.corpus import (
    CorpusError,
    CorpusSource,
    TokenCorpus,
    domain_table,
    split_names,
    token_corpus,
    tokenize_records,
)


def _read(source: CorpusSource) -> ray.data.Dataset:
    """All files of the corpus in one Ray Data read, each row tagged with its file's `path`."""
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the stream order must not depend on timing
    context.enable_progress_bars = False  # the job draws its own
    formats = {file.format for file in source.files.values()}
    if len(formats) > 1:
        raise CorpusError(f"{source.location}: mix of Parquet and JSONL splits; use one format")
    paths = [file.path for file in source.files.values()]
    if formats == {"parquet"}:
        return ray.data.read_parquet(paths, filesystem=source.fs, include_paths=True)
    return ray.data.read_json(paths, filesystem=source.fs, include_paths=True)  # JSON lines


def read_corpus(source: CorpusSource, valid_fraction: float) -> pa.Table:
    """Every record of the corpus on the driver: columns split, text (domain: prompt, facts).

    Reads everything now, so that a corrupt record fails here, naming the file and the reason.
    Domain records keep their file's split; plain documents are split by position, the last
    `valid_fraction` of them held out.
    """
    try:
        table = pa.concat_tables(ray.get(_read(source).to_arrow_refs()), promote_options="default")
    except (ray.exceptions.RayError, pa.ArrowException, OSError, ValueError) as error:
        # Ray wraps the reader's error; keep its message
        raise CorpusError(
            f"{source.location}: cannot read the corpus: {_first_line(error)}"
        ) from None
    split_of = {file.path: name for name, file in source.files.items()}
    if source.kind == "domain":
        return domain_table(table, [split_of[p] for p in table["path"].to_pylist()])
    count = table.num_rows
    n_valid = max(1, round(count * valid_fraction))
    if count - n_valid < 1:
        raise CorpusError(
            f"{source.location}: {count} document(s) cannot be split into train and valid"
        )
    splits = ["train"] * (count - n_valid) + ["valid"] * n_valid
    return pa.table({"split": splits, "text": table["text"]})


def tokenize_corpus(table: pa.Table, tokenizer: Tokenizer) -> dict[str, TokenCorpus]:
    """Tokenize with Ray Data (parallel, order kept); one TokenCorpus per split."""
    tokenized = ray.data.from_arrow(table).map_batches(
        tokenize_records,
        batch_format="pyarrow",
        fn_kwargs={"tokenizer_json": tokenizer.hf.to_str()},
    )
    tokens = pa.concat_tables(ray.get(tokenized.to_arrow_refs()))
    return {
        name: token_corpus(tokens.filter(pc.equal(tokens["split"], name)))
        for name in split_names(tokens)
    }


def _first_line(error: BaseException) -> str:
    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    lines = [line for line in str(cause).splitlines() if line.strip()]
    return lines[-1] if lines else type(cause).__name__
