"""ragline's vocabulary: every name a user can pick and every default, stated once.

Torch-free (it imports nothing but :mod:`ragline.errors`), so the CLI options, the HTTP schema, the web page
(served from ``GET /vocabulary``), the dataclass defaults and the library all read the same values.
"""

from __future__ import annotations

from ragline.errors import RaglineError

# Retrieval modes: dense (q(x)·d(z) by MIPS), BM25, and their reciprocal-rank fusion.
DENSE, BM25, HYBRID = "dense", "bm25", "hybrid"
MODES = (DENSE, BM25, HYBRID)
DEFAULT_MODE = DENSE

# Readers. RAG-Sequence and RAG-Token marginalise over the top-k passages; concat reads the top-k passages
# numbered in one prompt (what most toolkits do); fid (Fusion-in-Decoder, seq2seq generators) encodes each
# passage with the question and decodes from all of them at once; closed book reads no passage.
RAG_SEQUENCE, RAG_TOKEN, CONCAT, FID, CLOSED_BOOK = "rag-sequence", "rag-token", "concat", "fid", "closed-book"
MODELS = (RAG_SEQUENCE, RAG_TOKEN, CONCAT, FID, CLOSED_BOOK)
RAG_MODELS = (RAG_SEQUENCE, RAG_TOKEN)  # the marginalising readers
TRAINABLE_MODELS = (RAG_SEQUENCE, RAG_TOKEN, FID)  # what `train rag --model` trains
DEFAULT_MODEL = RAG_SEQUENCE

# Decodings of each model; the first is its default.
THOROUGH, FAST, BEAM, GREEDY = "thorough", "fast", "beam", "greedy"
DECODINGS: dict[str, tuple[str, ...]] = {RAG_SEQUENCE: (THOROUGH, FAST), RAG_TOKEN: (BEAM, GREEDY),
                                         CONCAT: (BEAM, GREEDY), FID: (BEAM, GREEDY), CLOSED_BOOK: (BEAM, GREEDY)}
ALL_DECODINGS = (THOROUGH, FAST, BEAM, GREEDY)

# Bundled models used when none is named (models/catalog.py locates them).
DEFAULT_ENCODER = "minilm"
DEFAULT_GENERATOR = "qwen2.5-0.5b"
TRAINING_GENERATOR = "smollm2"  # `ragline train rag`: small enough to fine-tune fully on a CPU

# Decoding defaults, the same for `ask`, `eval`, `report`, `serve` and the Python API.
DEFAULT_K = 5                 # passages marginalised over
DEFAULT_SEARCH_K = 10         # passages a search returns (ragline search, Rag.search, Retriever.search)
DEFAULT_BEAMS = 4
DEFAULT_MAX_NEW_TOKENS = 32
# Finished beams are ranked by log p / length ** LENGTH_PENALTY. 0 ranks by log p itself: the answers of the
# evaluation report; 1.0 (Hugging Face's default) favours longer answers.
DEFAULT_LENGTH_PENALTY = 0.0

# p_eta(z|x) = softmax_k(prior_scale * q(x)·d(z)). 20 suits unit-normalised encoders (MiniLM's cosines, which
# it was trained on with scale 20); the paper's DPR inner products take 1. Every index records the scale that
# fits its encoder (index/manifest.py: prior_scale), which commands use unless --prior-scale is given.
DEFAULT_PRIOR_SCALE = 20.0    # unit-normalised vectors (cosines)
DPR_PRIOR_SCALE = 1.0         # raw inner products (DPR, the paper)

# Number formats a generator answers in (models/precision.py); auto picks the fastest this CPU runs natively
# among those checked against fp32's answers for the generator.
FP32, BF16, INT8, AUTO = "fp32", "bf16", "int8", "auto"
PRECISIONS = (FP32, BF16, INT8, AUTO)
DEFAULT_PRECISION = AUTO

# Decoder-only generators keep the key/value states of prompt blocks they have read (the system prompt,
# passages) for reuse by later prompts (models/prefill.py): this many MiB per generator, least recent out first.
DEFAULT_KV_CACHE_MB = 512

# Citation marks (rag/citations.py): an answer read whole (RAG-Sequence) cites the fewest passages, largest
# posterior p(z|x,y) first, that hold at least this share of it.
CITATION_MASS = 0.5

# Hybrid fusion (index/hybrid.py): weight of the BM25 ranking (dense has weight 1) and the RRF constant c.
RRF_C = 20.0
BM25_WEIGHT = 0.3
HYBRID_DEPTH = 100            # candidates taken from each ranking before fusion

# Dense index types (index/dense_build.py): exact, exact over float16 vectors, HNSW, IVF-PQ, 8-bit scalar,
# IVF + 8-bit scalar; "auto" picks one by the corpus's size and the machine's memory (dense_build.choose_type).
INDEX_TYPES = ("flat", "fp16", "hnsw", "ivfpq", "sq8", "ivfsq8")
AUTO_INDEX_TYPE = "auto"
DEFAULT_INDEX_TYPE = AUTO_INDEX_TYPE
AUTO_EXACT_MAX = 250_000   # passages up to which auto keeps flat (a query scans 384 MB: about 13 ms here)
AUTO_MEMORY_SHARE = 0.25   # auto picks fp16 while its vectors take at most this share of the machine's memory

# Where models run (models/device.py): auto is a GPU when torch sees one, else the CPU.
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_DEVICE = "auto"

# Retrieval evaluation cut-offs (eval-retrieval, score, the report, training's held-back recall).
RETRIEVAL_KS = (1, 5, 10, 20, 100)


def default_decoding(model: str) -> str:
    """The decoding ``model`` uses when none is given."""
    return DECODINGS[model][0]


def check(model: str, decoding: str | None = None) -> None:
    """Refuse an unknown model, or a decoding ``model`` does not have, with the names to use."""
    if model not in MODELS:
        raise RaglineError(f"unknown model {model!r}", f"use one of {', '.join(MODELS)}")
    if decoding is not None and decoding not in DECODINGS[model]:
        raise RaglineError(f"{model} has no {decoding!r} decoding", f"use --decoding {' or '.join(DECODINGS[model])}")


def check_precision(precision: str) -> None:
    """Refuse an unknown precision with the names to use."""
    if precision not in PRECISIONS:
        raise RaglineError(f"unknown precision {precision!r}", f"use --precision {' or '.join(PRECISIONS)}")


def as_dict() -> dict:
    """The vocabulary as JSON-ready data (what ``GET /vocabulary`` serves to the page)."""
    return {"modes": list(MODES), "default_mode": DEFAULT_MODE, "models": list(MODELS), "default_model": DEFAULT_MODEL,
            "decodings": {m: list(d) for m, d in DECODINGS.items()}, "k": DEFAULT_K, "beams": DEFAULT_BEAMS,
            "max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "length_penalty": DEFAULT_LENGTH_PENALTY,
            "prior_scale": DEFAULT_PRIOR_SCALE, "citation_mass": CITATION_MASS}
