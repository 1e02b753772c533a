import random
import sys
import types

import pytest
import torch

from anybit.data import Corpus, random_windows
from anybit.errors import AnybitError


def test_random_windows_follow_protocol():
    ids = torch.arange(5000)
    windows = random_windows(ids, 64, 512, seed=0)
    rnd = random.Random(0)
    starts = [rnd.randint(0, 5000 - 512 - 1) for _ in range(64)]
    assert windows.shape == (64, 512)
    assert windows[:, 0].tolist() == starts
    assert torch.equal(windows[3], ids[starts[3] : starts[3] + 512])


def test_corpus_too_short_is_a_clear_error():
    with pytest.raises(AnybitError, match="fewer than one window"):
        random_windows(torch.arange(100), 4, 512, 0)


def test_text_corpus(text_file, tokenizer):
    corpus = Corpus(f"text:{text_file}")
    calib = corpus.calibration(tokenizer, 4, 64, seed=1)
    stream = corpus.evaluation(tokenizer, 64)
    assert calib.shape == (4, 64)
    assert stream.numel() == len(text_file.read_text())  # one token per character


@pytest.mark.parametrize("name", ["nope", "text:/no/such/file.txt"])
def test_unknown_or_missing_corpus(name):
    with pytest.raises(AnybitError):
        Corpus(name)


class _FakeSplit(dict):
    def __len__(self):
        return len(self["text"])

    def __getitem__(self, key):
        if isinstance(key, str):
            return dict.__getitem__(self, key)
        if isinstance(key, slice):
            return {"text": self["text"][key]}
        return {"text": self["text"][key]}


def _install_fake_datasets(monkeypatch, loader):
    fake = types.ModuleType("datasets")
    fake.load_dataset = loader
    monkeypatch.setitem(sys.modules, "datasets", fake)


def test_wikitext2_follows_gptq_loader(monkeypatch, tokenizer):
    from tests.conftest import tiny_text

    calls = []

    def load_dataset(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        return _FakeSplit(text=[tiny_text(800, seed=i) for i in range(3)])

    _install_fake_datasets(monkeypatch, load_dataset)
    corpus = Corpus("wikitext2")
    calib = corpus.calibration(tokenizer, 2, 32, seed=0)
    stream = corpus.evaluation(tokenizer, 32)
    assert calls == [("wikitext", "wikitext-2-raw-v1", "train"), ("wikitext", "wikitext-2-raw-v1", "test")]
    assert calib.shape == (2, 32)
    text = "\n\n".join(tiny_text(800, seed=i) for i in range(3))
    assert stream.numel() == len(text)  # one token per character


def test_c4_samples_long_documents(monkeypatch, tokenizer):
    docs = ["short", "x" * 10] + [" ".join(["king"] * 40)] * 3

    def load_dataset(path, data_files=None, split=None, **kw):
        assert path == "allenai/c4" and split in data_files
        return _FakeSplit(text=docs)

    _install_fake_datasets(monkeypatch, load_dataset)
    calib = Corpus("c4").calibration(tokenizer, 3, 16, seed=0)
    assert calib.shape == (3, 16)
    assert Corpus("c4").evaluation(tokenizer, 16).numel() <= 256 * 16


def test_offline_dataset_is_a_clear_error(monkeypatch, tokenizer):
    def load_dataset(*a, **kw):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    _install_fake_datasets(monkeypatch, load_dataset)
    with pytest.raises(AnybitError, match="offline"):
        Corpus("wikitext2").calibration(tokenizer, 2, 32, 0)


def test_missing_datasets_library_is_a_clear_error(monkeypatch, tokenizer):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(AnybitError, match="pip install"):
        Corpus("c4").evaluation(tokenizer, 32)
