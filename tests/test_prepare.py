"""Data preparation: split by document, lossless packing, offline tasks, input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import tiny_prepare_cfg
from layerchop.data.prepare import IGNORE_INDEX, PackedDataset, prepare, read_splits, split_documents
from layerchop.io import read_json


def test_split_is_by_document_deterministic_and_order_free():
    ids = [f"d{i}" for i in range(50)]
    a = split_documents(ids, 0.1, 0.1, seed=3)
    b = split_documents(list(reversed(ids)), 0.1, 0.1, seed=3)
    c = split_documents(ids, 0.1, 0.1, seed=4)
    assert a == b
    assert a != c
    assert sorted(a) == sorted(ids)
    counts = {s: sum(v == s for v in a.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 40, "val": 5, "test": 5}
    tiny = split_documents(["a", "b", "c"], 0.01, 0.01, seed=0)
    assert sorted(tiny.values()) == ["test", "train", "val"]


def test_split_needs_three_documents():
    with pytest.raises(ValueError, match="2 document"):
        split_documents(["a", "b"], 0.1, 0.1, seed=0)


def test_packing_loses_no_token(tiny_prepared, tiny_corpus, tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    counts = read_json(tiny_prepared / "counts.json")
    docs = {json.loads(line)["id"]: json.loads(line)["text"] for line in open(tiny_corpus / "documents.jsonl")}
    splits = read_splits(tiny_prepared)
    seen_docs = []
    for split in ("train", "val", "test"):
        info = counts["splits"][split]
        seen_docs += splits[split]
        assert info["documents"] == len(splits[split])
        # the corpus file order within a split is preserved by packing
        order = [d for d in docs if d in set(splits[split])]
        expected = []
        for d in order:
            expected += tok(docs[d], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ds = PackedDataset(tiny_prepared, split)
        got = []
        for i in range(len(ds)):
            row = ds[i]
            keep = row["labels"] != IGNORE_INDEX
            got += row["input_ids"][keep].tolist()
            assert row["input_ids"].shape == (32,)
        assert got == expected
        assert info["tokens"] == len(expected)
        assert info["sequences"] == -(-len(expected) // 32)
    assert sorted(seen_docs) == sorted(docs)  # every document in exactly one split


def test_offline_tasks_are_well_formed(tiny_prepared, tiny_corpus):
    import yaml

    counts = read_json(tiny_prepared / "counts.json")
    assert counts["tasks"] == {"heldout_continuation": 12, "heldout_lastword": 12}
    docs = {json.loads(line)["id"]: json.loads(line)["text"] for line in open(tiny_corpus / "documents.jsonl")}
    test_ids = read_splits(tiny_prepared)["test"]
    test_words = " ".join(" ".join(docs[d].split()) for d in test_ids)
    test_lines = [" ".join(line.split()) for d in test_ids for line in docs[d].splitlines()]
    for name in ("heldout_continuation", "heldout_lastword"):
        cfg = yaml.safe_load(open(tiny_prepared / "tasks" / f"{name}.yaml"))
        assert cfg["task"] == name and cfg["output_type"] == "multiple_choice"
        items = [json.loads(line) for line in open(tiny_prepared / "tasks" / f"{name}.jsonl")]
        assert len(items) == 12
        for it in items:
            assert len(it["choices"]) == 4 == len(set(it["choices"]))
            assert 0 <= it["label"] < 4
            true = it["choices"][it["label"]]
            if name == "heldout_continuation":
                # the true continuation follows the passage in the held-out (test) text
                assert f"{it['context']} {true}" in test_words
                assert all(len(c.split()) == 4 for c in it["choices"])
            else:
                # the passage ends one word before the end of a held-out line, and that word is the answer
                assert any(line.rstrip(".,;:!?'\"-)").endswith(f"{it['context'].split()[-1]} {true}")
                           for line in test_lines)


def test_seq_len_above_context_fails_before_output(tmp_path, tiny_corpus, tiny_dir):
    with pytest.raises(ValueError, match=r"prepare.seq_len=4096 .*max_position_embeddings=128"):
        prepare(tiny_corpus, tiny_dir, tmp_path / "p", tiny_prepare_cfg(seq_len=4096))
    assert not (tmp_path / "p").exists()


def test_empty_corpus_fails(tmp_path, tiny_dir):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "documents.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"the corpus is empty \(0 documents\); check download.corpus"):
        prepare(tmp_path / "c", tiny_dir, tmp_path / "p", tiny_prepare_cfg())
    assert not (tmp_path / "p").exists()


def test_memmap_dtype_is_compact(tiny_prepared):
    counts = read_json(tiny_prepared / "counts.json")
    assert counts["dtype"] == "uint16"
    size = (tiny_prepared / "train.bin").stat().st_size
    assert size == counts["splits"]["train"]["sequences"] * 32 * np.dtype(np.uint16).itemsize


def test_parallel_shards_pack_the_same_bytes_and_counts_stay_small(tmp_path, tiny_corpus, tiny_dir, tiny_prepared):
    """num_proc workers tokenizing contiguous shards give byte-identical splits; counts.json does not grow with
    the number of documents (every rank reads it)."""
    parallel = tmp_path / "parallel"
    prepare(tiny_corpus, tiny_dir, parallel, tiny_prepare_cfg(num_proc=2, batch_size=3))
    for name in ("train.bin", "val.bin", "test.bin", "splits.tsv"):
        assert (parallel / name).read_bytes() == (tiny_prepared / name).read_bytes(), name
    a, b = read_json(parallel / "counts.json"), read_json(tiny_prepared / "counts.json")
    assert a == b
    assert not (parallel / ".shards").exists()
    # a corpus 20x larger: counts.json stays the same size (give or take digits)
    big = tmp_path / "big"
    big.mkdir()
    lines = (tiny_corpus / "documents.jsonl").read_text().splitlines()
    with open(big / "documents.jsonl", "w") as f:
        for k in range(20):
            for line in lines:
                doc = json.loads(line)
                f.write(json.dumps({**doc, "id": f"{doc['id']}-{k}"}) + "\n")
    prepare(big, tiny_dir, tmp_path / "big_prepared", tiny_prepare_cfg(num_proc=2))
    size_small = (tiny_prepared / "counts.json").stat().st_size
    assert (tmp_path / "big_prepared" / "counts.json").stat().st_size < size_small + 200


def _first_train_document(prepared, corpus) -> str:
    docs = {json.loads(line)["id"]: json.loads(line)["text"] for line in open(corpus / "documents.jsonl")}
    return docs[read_splits(prepared)["train"][0]]


def _packed_tokens(prepared, counts) -> np.ndarray:
    return np.fromfile(prepared / "train.bin", dtype=counts["dtype"])[:counts["splits"]["train"]["tokens"]]


def _lm_eval_context_ids(model_dir, text: str) -> list[int]:
    """The ids lm-eval (HFLM, add_bos_token left at its default) puts in a loglikelihood request's context."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    lm = HFLM(pretrained=AutoModelForCausalLM.from_pretrained(model_dir), tokenizer=AutoTokenizer.from_pretrained(
        model_dir), batch_size=1, device="cpu")
    return lm.tok_encode(text)


def test_one_token_format_with_a_tokenizer_that_adds_bos(tmp_path, tiny_dir, tiny_corpus):
    """A Llama-2-style tokenizer (its post-processor puts <s> before every text): every packed document starts
    with <s>, and a packed row holds exactly the ids lm-eval sends for the same text (then EOS)."""
    from tokenizers import processors
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    model_dir = tmp_path / "llama2-style"
    AutoModelForCausalLM.from_pretrained(tiny_dir).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok("a b")["input_ids"][0] == bos  # as Llama-2's does
    counts = prepare(tiny_corpus, model_dir, tmp_path / "prepared", tiny_prepare_cfg())
    assert counts["document_prefix_ids"] == [bos]
    text = _first_train_document(tmp_path / "prepared", tiny_corpus)
    request = _lm_eval_context_ids(model_dir, text)
    assert request[0] == bos
    tokens = _packed_tokens(tmp_path / "prepared", counts)  # the rows of the train split, end to end
    assert tokens[:len(request) + 2].tolist() == request + [tok.eos_token_id, bos]  # the next one starts with <s>
    assert PackedDataset(tmp_path / "prepared", "train")[0]["input_ids"][0] == bos
    starts = np.flatnonzero(np.r_[True, tokens[:-1] == tok.eos_token_id])
    assert len(starts) == counts["splits"]["train"]["documents"] and (tokens[starts] == bos).all()


def test_one_token_format_with_smollm2s_tokenizer(tmp_path, smollm2_dir, tiny_corpus):
    """SmolLM2's tokenizer adds nothing before a text: packed documents start with their own first token, as
    lm-eval's requests do."""
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    counts = prepare(tiny_corpus, smollm2_dir, tmp_path / "prepared", tiny_prepare_cfg())
    assert counts["document_prefix_ids"] == []
    text = _first_train_document(tmp_path / "prepared", tiny_corpus)
    request = _lm_eval_context_ids(smollm2_dir, text)
    assert request == tok(text, add_special_tokens=False)["input_ids"]
    assert _packed_tokens(tmp_path / "prepared", counts)[:len(request) + 1].tolist() == request + [tok.eos_token_id]
