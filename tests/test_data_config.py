"""Data config: every field has a default, overrides of unknown keys fail, one-line errors."""
import pytest

from comigs_jax.data import default_data_config, validate_data_config


def test_default_is_valid_and_lockable():
    c = default_data_config()
    validate_data_config(c)
    c.lock()
    with pytest.raises((AttributeError, KeyError)):
        c.no_such_option = 1
    for src in ("slimpajama", "agnews", "wikipedia"):
        c2 = default_data_config()
        c2.source = src
        validate_data_config(c2)


@pytest.mark.parametrize("key,value,expect", [
    ("source", "pile", r"data.source='pile'.*synthetic, text_files, slimpajama, agnews, wikipedia"),
    ("partition", "iid", r"data.partition='iid'.*specific, mixed, dirichlet, ood"),
    ("n_users", 0, r"data.n_users=0"),
    ("train_tokens", -5, r"data.train_tokens=-5.*positive"),
    ("valid_tokens", 0, r"data.valid_tokens=0"),
    ("test_tokens", 100, r"data.test_tokens=100.*min_tokens=129"),
    ("dtype", "int8", r"data.dtype='int8'"),
    ("mixed_share", 1.0, r"data.mixed_share=1.0"),
    ("dirichlet_alpha", 0.0, r"data.dirichlet_alpha=0.0"),
])
def test_bad_values_name_key_value_and_allowed(key, value, expect):
    c = default_data_config()
    c[key] = value
    with pytest.raises(ValueError, match=expect) as e:
        validate_data_config(c)
    assert "\n" not in str(e.value)


def test_unknown_categories_and_languages_list_valid_ones(tmp_path):
    c = default_data_config()
    c.source = "slimpajama"
    c.categories = "ArXiv,Books"
    with pytest.raises(ValueError, match=r"unknown category 'Books'; valid: ArXiv, Book, C4, CommonCrawl"):
        validate_data_config(c)
    c.source = "agnews"
    c.categories = "World,Tech"
    with pytest.raises(ValueError, match=r"unknown category 'Tech'; valid: World, Sports, Business, Sci/Tech"):
        validate_data_config(c)
    c.source = "wikipedia"
    c.categories = "de,xx"
    with pytest.raises(ValueError, match=r"unknown language 'xx'; valid: de, fr, it"):
        validate_data_config(c)
    c.wikipedia.extra_languages = "xx"
    validate_data_config(c)
    c.wikipedia.dump = "2023"
    with pytest.raises(ValueError, match="data.wikipedia.dump='2023'"):
        validate_data_config(c)
    c = default_data_config()
    c.source = "text_files"
    with pytest.raises(ValueError, match=r"data.text_files.root=''.*prepare_local_corpus"):
        validate_data_config(c)
    (tmp_path / "de").mkdir()
    (tmp_path / "fr").mkdir()
    c.text_files.root = str(tmp_path)
    c.categories = "de,en"
    with pytest.raises(ValueError, match=r"unknown category 'en'; valid: de, fr"):
        validate_data_config(c)
    c.text_files.root = str(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"data.text_files.root=.*missing"):
        validate_data_config(c)


def test_synthetic_fields():
    c = default_data_config()
    for key, value in [("vocab_size", 1), ("general_branching", 0), ("specific_branching", 10_000),
                       ("switch_rate", 0.0), ("specific_share_max", 1.5), ("concentration", -1.0),
                       ("base_knows_shared", 1.5), ("base_knows_shared", -0.5)]:
        c2 = default_data_config()
        c2.synthetic[key] = value
        with pytest.raises(ValueError, match=f"data.synthetic.{key}="):
            validate_data_config(c2)
    c.partition = "mixed"
    with pytest.raises(ValueError, match="synthetic"):
        validate_data_config(c)


def test_tokenizer_path_checked(tmp_path):
    c = default_data_config()
    c.source = "agnews"
    c.tokenizer = str(tmp_path / "nope")
    with pytest.raises(ValueError, match="data.tokenizer="):
        validate_data_config(c)
    c.tokenizer = "openai-community/gpt2"
    validate_data_config(c)
