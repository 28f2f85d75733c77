"""Every data option, with its default, and a cheap validator.

`default_data_config()` is embedded by the experiment configs as `config.data`; configs are locked,
so every field a run may set exists here. `validate_data_config` does no I/O beyond `os.path`
checks and raises `ValueError` with one line naming the key, the value and what is allowed.
"""
from __future__ import annotations

import glob
import os
import re

import ml_collections

SOURCES = ("synthetic", "text_files", "slimpajama", "agnews", "wikipedia", "reference_bins")
PARTITIONS = ("specific", "mixed", "dirichlet", "ood")
SPLITS = ("train", "valid", "test")

# SlimPajama's `meta.redpajama_set_name` is "RedPajama" + one of these.
SLIMPAJAMA_CATEGORIES = ("ArXiv", "Book", "C4", "CommonCrawl", "Github", "StackExchange", "Wikipedia")
# AG News `label` 0..3 (the paper's labels 1..4).
AGNEWS_CATEGORIES = ("World", "Sports", "Business", "Sci/Tech")
# Language editions of `wikimedia/wikipedia` (dump 20231101) accepted without further ado; add
# others through data.wikipedia.extra_languages.
WIKIPEDIA_LANGUAGES = (
    "de", "fr", "it", "es", "nl", "pl", "pt", "ru", "ja", "zh", "en", "sv", "uk", "ar", "ca", "cs",
    "da", "fi", "el", "he", "hu", "id", "ko", "no", "ro", "sr", "tr", "vi", "fa", "bg", "et", "eu",
    "gl", "hr", "hi", "lt", "lv", "ms", "sk", "sl", "th", "eo", "simple", "ceb", "war", "arz",
)
TEXT_SAMPLE_BY = ("paragraph", "line", "document")


def default_data_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.source = "synthetic"  # one of synthetic | text_files | slimpajama | agnews | wikipedia | reference_bins
    c.dir = ""  # reference_bins: folder of the reference runner's layout <dir>/<n_users>/{train,valid,test}_{i}.bin
    c.n_users = 4  # number of users U (all of them are partitioned; load_user_data may build a subset)
    c.categories = ""  # comma-separated categories / languages / folder names to draw users from; "" = the source's defaults in order
    c.partition = "specific"  # specific (one category per user) | mixed (pairs, mixed_share) | dirichlet | ood
    c.mixed_share = 0.25  # 'mixed': user 2p takes this share of category 2p and 1-share of 2p+1; user 2p+1 the reverse (reference: 1/4, 3/4)
    c.dirichlet_alpha = 0.5  # 'dirichlet': concentration of each user's Dirichlet mixture over the categories (seeded per user)
    c.ood_shift = 1  # 'ood': user i validates/tests on category i and trains mostly on category i + ood_shift (mod C)
    c.ood_target_share = 0.0  # 'ood': share of the user's own (target) category in its training split
    c.train_tokens = 1_000_000  # tokens per user in the training split (experts)
    c.valid_tokens = 200_000  # tokens per user in the validation split (routers)
    c.test_tokens = 200_000  # tokens per user in the test split (evaluation)
    c.train_shares = ""  # per-user share of the training split kept (its first tokens), comma-separated, e.g. "0.25,0.25,1,1" for low- and high-resource users ("" = all)
    c.min_tokens = 129  # every user split must hold at least this many tokens (one window: seq_len + 1)
    c.allow_fewer_tokens = False  # if the source runs dry, keep what there is (>= min_tokens) instead of failing
    c.tokenizer = "gpt2"  # "gpt2" = bundled GPT-2 BPE; else a tokenizer directory or hub id ("base" in experiment configs: the run's base's own, resolved by comigs_jax.experiment)
    c.dtype = "auto"  # token array dtype: auto (uint16 if the vocabulary fits) | uint16 | uint32 (reference_bins: the files' dtype)
    c.seed = 0  # seeds document shuffling, split assignment, Dirichlet mixtures and the synthetic process
    c.cache_dir = "~/.cache/comigs_jax/data"  # token caches (one file per user) and bases/ (the demo's pretrained bases, converted GGUF bases); hub downloads stay in HF's own caches
    c.use_cache = True  # read/write token caches; False always rebuilds and writes nothing
    c.shuffle_buffer = 10_000  # streaming sources: shuffle buffer in documents (0 = stream order)
    c.max_documents = 0  # stop reading a source after this many rows (0 = no limit)
    c.tokenize_batch = 512  # documents per tokenizer call (the Rust tokenizer encodes a batch on all cores)
    c.progress = True  # show a progress bar while tokenising

    c.slimpajama = ml_collections.ConfigDict()
    c.slimpajama.dataset = "DKYoon/SlimPajama-6B"  # hub id; the full corpus is cerebras/SlimPajama-627B (same schema)
    c.slimpajama.config_name = ""  # hub configuration name ("" = default)
    c.slimpajama.split = "train"  # hub split read (our train/valid/test are cut from it by document)
    c.slimpajama.revision = ""  # hub revision (commit or tag; "" = main)
    c.slimpajama.streaming = True  # stream rows instead of downloading the whole split
    c.slimpajama.data_files = ""  # local json/jsonl/parquet files (glob) with the hub schema; replaces the hub

    c.agnews = ml_collections.ConfigDict()
    c.agnews.dataset = "fancyzhx/ag_news"  # hub id (formerly `ag_news`)
    c.agnews.config_name = ""  # hub configuration name ("" = default)
    c.agnews.split = "train"  # hub split read (our train/valid/test are cut from it by document)
    c.agnews.revision = ""  # hub revision ("" = main)
    c.agnews.streaming = False  # AG News is small (120k rows): download it
    c.agnews.data_files = ""  # local json/jsonl/parquet/csv files (glob) with columns text, label; replaces the hub

    c.wikipedia = ml_collections.ConfigDict()
    c.wikipedia.dataset = "wikimedia/wikipedia"  # hub id; configurations are "<dump>.<language>"
    c.wikipedia.dump = "20231101"  # dump date of the hub configuration
    c.wikipedia.split = "train"  # hub split read (our train/valid/test are cut from it by document)
    c.wikipedia.revision = ""  # hub revision ("" = main)
    c.wikipedia.streaming = True  # stream rows instead of downloading whole language editions
    c.wikipedia.data_files = ""  # local files with columns text (and title); "{lang}" in the glob is the language
    c.wikipedia.extra_languages = ""  # comma-separated language codes accepted besides the built-in list

    c.text_files = ml_collections.ConfigDict()
    c.text_files.root = ""  # folder holding one sub-folder per category (user); see experiments/prepare_local_corpus.py. A sub-folder with train.*, valid.* (or validation.*) and test.* files is used as those splits, as given
    c.text_files.pattern = "**/*"  # glob of files inside each category folder (.jsonl/.json read as JSON, others as text)
    c.text_files.sample_by = "paragraph"  # plain text documents: paragraph (blank-line separated) | line | document (whole file)
    c.text_files.text_field = "text"  # JSON files: the field holding the document text

    c.synthetic = ml_collections.ConfigDict()
    c.synthetic.vocab_size = 512  # number of token ids
    c.synthetic.general_branching = 16  # successors per token in the shared (general) chain
    c.synthetic.specific_branching = 4  # successors per token in each user's own (specific) chain
    c.synthetic.concentration = 1.0  # Dirichlet concentration of each row's successor weights
    c.synthetic.specific_share_min = 0.3  # stationary share of the specific chain of user 0
    c.synthetic.specific_share_max = 0.7  # ... of user U-1 (users in between are spaced linearly)
    c.synthetic.switch_rate = 0.1  # P(leave general) = rate*share, P(leave specific) = rate*(1-share); 1 = no memory
    c.synthetic.target_share_shift = 0.0  # validation and test drawn with each user's specific share moved to share + shift * (1 - share) (an out-of-distribution target the training split under-represents); 0 = the training split's process
    c.synthetic.base_knows_shared = 1.0  # share of the shared (general) chain's rows that are the base chain's, the chain base="pretrain" is trained on (the others drawn afresh); 1 = the base knows the shared chain
    return c


def split_list(value) -> list[str]:
    """A comma-separated string (or a list/tuple) -> list of stripped, non-empty names."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v).strip() for v in value if str(v).strip()]


def train_shares_of(data_cfg) -> list[float] | None:
    """The per-user shares of data.train_shares (validated), or None when unset."""
    text = data_cfg.get("train_shares", "")
    if not text:
        return None
    try:
        shares = [float(v) for v in split_list(text)]
    except ValueError:
        _fail("train_shares", text, "comma-separated shares in (0, 1], one per user")
    if len(shares) != data_cfg.n_users:
        _fail("train_shares", text, f"{data_cfg.n_users} shares (data.n_users), one per user")
    if not all(0.0 < v <= 1.0 for v in shares):
        _fail("train_shares", text, "shares in (0, 1] (the part of each user's training split kept)")
    return shares


def _fail(key: str, value, allowed: str):
    raise ValueError(f"data.{key}={value!r} is not allowed: {allowed}")


def text_files_categories(root: str) -> list[str]:
    root = os.path.expanduser(root)
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))


def source_categories(data_cfg) -> tuple[list[str], list[str]]:
    """(all valid categories, the default order) of the configured source; only os.path I/O."""
    src = data_cfg.source
    if src == "slimpajama":
        return list(SLIMPAJAMA_CATEGORIES), list(SLIMPAJAMA_CATEGORIES)
    if src == "agnews":
        return list(AGNEWS_CATEGORIES), list(AGNEWS_CATEGORIES)
    if src == "wikipedia":
        langs = list(WIKIPEDIA_LANGUAGES) + [l for l in split_list(data_cfg.wikipedia.extra_languages)
                                             if l not in WIKIPEDIA_LANGUAGES]
        return langs, langs
    if src == "text_files":
        cats = text_files_categories(data_cfg.text_files.root)
        return cats, cats
    return [], []


def resolve_categories(data_cfg) -> list[str]:
    """The categories users are drawn from, in order (validated)."""
    valid, default = source_categories(data_cfg)
    cats = split_list(data_cfg.categories) or default
    return cats


def validate_data_config(data_cfg) -> None:
    """Cheap checks of every data option (no I/O beyond os.path); raises ValueError, one line."""
    d = data_cfg
    _validate_sizes_and_shares(d)
    _validate_tokenizer(d)
    if d.source == "reference_bins":
        _validate_reference_bins(d)
        return
    if d.source == "synthetic":
        _validate_synthetic(d)
        if d.partition != "specific":
            _fail("partition", d.partition, "'specific' for the synthetic source (its users are defined by the process)")
        return
    _validate_source_files(d)
    _validate_categories(d)


def _validate_sizes_and_shares(d) -> None:
    """The source, partition, token counts, shares and batch options every source has."""
    if d.source not in SOURCES:
        _fail("source", d.source, f"one of {', '.join(SOURCES)}")
    if d.partition not in PARTITIONS:
        _fail("partition", d.partition, f"one of {', '.join(PARTITIONS)}")
    if not isinstance(d.n_users, int) or d.n_users < 1:
        _fail("n_users", d.n_users, "a positive integer")
    for s in SPLITS:
        v = d[f"{s}_tokens"]
        if not isinstance(v, int) or v < 1:
            _fail(f"{s}_tokens", v, "a positive integer number of tokens per user")
    if not isinstance(d.min_tokens, int) or d.min_tokens < 2:
        _fail("min_tokens", d.min_tokens, "an integer >= 2 (one window is seq_len + 1 tokens)")
    for s in SPLITS:
        if d[f"{s}_tokens"] < d.min_tokens:
            _fail(f"{s}_tokens", d[f"{s}_tokens"], f"at least min_tokens={d.min_tokens} (one window: seq_len + 1)")
    train_shares_of(d)
    if d.dtype not in ("auto", "uint16", "uint32"):
        _fail("dtype", d.dtype, "one of auto, uint16, uint32")
    if not 0.0 < d.mixed_share < 1.0:
        _fail("mixed_share", d.mixed_share, "a share strictly between 0 and 1")
    if not d.dirichlet_alpha > 0:
        _fail("dirichlet_alpha", d.dirichlet_alpha, "a positive concentration")
    if not 0.0 <= d.ood_target_share < 1.0:
        _fail("ood_target_share", d.ood_target_share, "a share in [0, 1)")
    if not isinstance(d.ood_shift, int):
        _fail("ood_shift", d.ood_shift, "an integer")
    for k in ("shuffle_buffer", "max_documents"):
        if not isinstance(d[k], int) or d[k] < 0:
            _fail(k, d[k], "a non-negative integer (0 = off / no limit)")
    if not isinstance(d.tokenize_batch, int) or d.tokenize_batch < 1:
        _fail("tokenize_batch", d.tokenize_batch, "a positive integer")


def _validate_tokenizer(d) -> None:
    if not d.tokenizer:
        _fail("tokenizer", d.tokenizer, "'gpt2' (bundled BPE), a tokenizer directory or a hub id")
    if d.source != "synthetic" and d.tokenizer not in ("gpt2", "base"):
        tok = os.path.expanduser(d.tokenizer)
        if d.tokenizer.startswith((".", "/", "~")) or os.path.exists(tok):
            if not os.path.isdir(tok):
                _fail("tokenizer", d.tokenizer, "an existing tokenizer directory, 'gpt2' (bundled BPE) or a hub id")
        elif not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", d.tokenizer):
            _fail("tokenizer", d.tokenizer, "'gpt2' (bundled BPE), a tokenizer directory or a hub id 'owner/name'")


def _validate_source_files(d) -> None:
    """The text-file and hub sources' own options: folders, globs, dump dates."""
    if d.source == "text_files":
        root = d.text_files.root
        if not root:
            _fail("text_files.root", root, "a folder with one sub-folder of .txt/.jsonl files per user "
                  "(build one with `python -m experiments.prepare_local_corpus`)")
        if not os.path.isdir(os.path.expanduser(root)):
            _fail("text_files.root", root, "an existing folder with one sub-folder per user")
        if d.text_files.sample_by not in TEXT_SAMPLE_BY:
            _fail("text_files.sample_by", d.text_files.sample_by, f"one of {', '.join(TEXT_SAMPLE_BY)}")
        if not d.text_files.pattern:
            _fail("text_files.pattern", d.text_files.pattern, "a glob such as '**/*' or '*.txt'")
    if d.source in ("slimpajama", "agnews", "wikipedia"):
        sub = d[d.source]
        if not sub.dataset and not sub.data_files:
            _fail(f"{d.source}.dataset", sub.dataset, "a hub id, or set data_files to local files")
        if sub.data_files and d.source != "wikipedia":
            if not glob.glob(os.path.expanduser(sub.data_files), recursive=True):
                _fail(f"{d.source}.data_files", sub.data_files, "a glob matching local json/jsonl/parquet files")
        if d.source == "wikipedia" and not re.fullmatch(r"\d{8}", d.wikipedia.dump):
            _fail("wikipedia.dump", d.wikipedia.dump, "a dump date YYYYMMDD such as 20231101")


def _validate_categories(d) -> None:
    """The categories (languages for Wikipedia) of a non-synthetic source, and their files."""
    valid, _ = source_categories(d)
    cats = resolve_categories(d)
    what = "language" if d.source == "wikipedia" else "category"
    if not cats:
        _fail("categories", d.categories, f"at least one {what}; the source offers none")
    for c in cats:
        if c not in valid:
            _fail("categories", d.categories, f"unknown {what} {c!r}; valid: {', '.join(valid)}")
    if len(set(cats)) != len(cats):
        _fail("categories", d.categories, "each category at most once")
    if d.partition in ("mixed", "ood", "dirichlet") and len(cats) < 2:
        _fail("categories", d.categories, f"at least 2 categories for partition {d.partition!r}")
    if d.source == "text_files":
        _validate_population(d, cats)
        from comigs_jax.data import presplit  # pre-split folders: train/valid/test files used as given

        try:
            if presplit.presplit_categories(d, cats):
                presplit.check_partition(d, cats)
        except RuntimeError as e:  # DataSourceError: a folder that is half pre-split
            raise ValueError(str(e)) from None
    if d.source == "wikipedia" and d.wikipedia.data_files:
        for c in cats:
            pat = os.path.expanduser(d.wikipedia.data_files.replace("{lang}", c))
            if not glob.glob(pat, recursive=True):
                _fail("wikipedia.data_files", d.wikipedia.data_files, f"a glob matching local files for language {c!r}")


def _validate_population(d, cats: list[str]) -> None:
    """A `prepare_local_corpus --many-users` folder is one user per folder: never fewer folders than users."""
    path = os.path.join(os.path.expanduser(d.text_files.root), "manifest.json")
    if d.n_users <= len(cats) or not os.path.isfile(path):
        return
    import json

    try:
        with open(path, encoding="utf-8") as f:
            pop = json.load(f).get("population")
    except (OSError, ValueError):
        return
    if pop:
        _fail("n_users", d.n_users, f"at most the {len(cats)} users of {d.text_files.root} (one per folder); lower "
              f"data.n_users or rebuild it: python -m experiments.prepare_local_corpus --many-users --out "
              f"{d.text_files.root} --n-users {d.n_users} (lower --min-tokens if too few units reach it)")


def _validate_reference_bins(d) -> None:
    if not d.dir:
        _fail("dir", d.dir, "the reference runner's data folder holding <n_users>/{train,valid,test}_{i}.bin "
              "(--config.data.dir=DIR)")
    root = os.path.expanduser(d.dir)
    if not os.path.isdir(root):
        _fail("dir", d.dir, "an existing folder holding <n_users>/{train,valid,test}_{i}.bin")
    sub = os.path.join(root, str(d.n_users))
    if not os.path.isdir(sub):
        have = sorted(x for x in os.listdir(root) if x.isdigit() and os.path.isdir(os.path.join(root, x)))
        _fail("n_users", d.n_users, f"a user count with a folder {sub} (found: {', '.join(have) or 'none'})")
    if d.partition != "specific":
        _fail("partition", d.partition, "'specific' for reference_bins (user i's splits are its files, as given)")
    if d.categories:
        _fail("categories", d.categories, "'' for reference_bins (users are the files' indices)")


def _validate_synthetic(d) -> None:
    s = d.synthetic
    if not isinstance(s.vocab_size, int) or s.vocab_size < 2:
        _fail("synthetic.vocab_size", s.vocab_size, "an integer >= 2")
    if d.dtype == "uint16" and s.vocab_size > 65536:
        _fail("dtype", d.dtype, f"uint32 or auto for vocab_size {s.vocab_size} > 65536")
    for k in ("general_branching", "specific_branching"):
        if not isinstance(s[k], int) or not 1 <= s[k] <= s.vocab_size:
            _fail(f"synthetic.{k}", s[k], f"an integer in [1, vocab_size={s.vocab_size}]")
    if not s.concentration > 0:
        _fail("synthetic.concentration", s.concentration, "a positive Dirichlet concentration")
    for k in ("specific_share_min", "specific_share_max"):
        if not 0.0 <= s[k] <= 1.0:
            _fail(f"synthetic.{k}", s[k], "a share in [0, 1]")
    if s.specific_share_min > s.specific_share_max:
        _fail("synthetic.specific_share_min", s.specific_share_min,
              f"at most specific_share_max={s.specific_share_max}")
    if not 0.0 < s.switch_rate <= 1.0:
        _fail("synthetic.switch_rate", s.switch_rate, "a rate in (0, 1]")
    d = s.get("target_share_shift", 0.0)
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
        _fail("synthetic.target_share_shift", d, "a shift in [0, 1) of the validation and test splits' specific "
              "share towards 1 (0: the training split's process)")
    k = s.get("base_knows_shared", 1.0)
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0.0 <= k <= 1.0:
        _fail("synthetic.base_knows_shared", k, "a share in [0, 1] of the shared chain's rows the base knows "
              "(1: the base is pretrained on the shared chain itself, 0: on an unrelated chain)")
