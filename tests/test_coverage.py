"""The share of a model's parameters the featurizer tracks, measured on every family a user
brings (dense and mixture-of-experts), said by `ingest gradients` and `info`, warned about when
matrices are left out; and --dim bounded by the model."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from databases import run_cli
from tiny_checkpoints import sentences
from tiny_families import DENSE, EXPERTS, make_family
from tiny_models import random_batch

from trackstar_db.errors import ParameterError
from trackstar_db.featurizer import Featurizer, FeaturizerConfig
from trackstar_db.featurizer.config import FeaturizerWarning
from trackstar_db.testbed.vocab import build_tokenizer

SHARE = 0.95


@pytest.mark.parametrize("family", DENSE + EXPERTS)
def test_every_family_is_featurized_with_95_percent_tracked(family):
    model = make_family(family)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FeaturizerWarning)  # no matrix left out, dim 512 is wide enough
        featurizer = Featurizer(model, FeaturizerConfig(dim=512, correction="none"))
    cover = featurizer.coverage
    trainable = [p for p in model.parameters() if p.requires_grad]
    # what is left out is exactly the 1-D parameters (biases, norm gains), counted independently
    vectors = {p.data_ptr(): p for p in trainable}.values()
    one_d = sum(p.numel() for p in vectors if p.dim() < 2)
    assert cover.untracked == ()
    assert cover.total == sum(p.numel() for p in vectors)
    assert cover.tracked == cover.total - one_d
    assert cover.share >= SHARE, f"{family}: {cover.share:.1%} tracked"
    if family in EXPERTS:
        assert any(kind == "experts" for m in featurizer.tracked for _, kind in m.uses)
        assert any(kind == "router" for m in featurizer.tracked for _, kind in m.uses)
    out = featurizer.featurize(random_batch(2)).vectors["uncorrected"]
    assert torch.isfinite(out).all() and (out.norm(dim=1) > 0).all()


def test_an_untracked_matrix_is_named_in_one_warning():
    model = make_family("llama")
    model.model.extra_table = torch.nn.Parameter(torch.randn(8, 32))  # a 2-D parameter no module kind uses
    with pytest.warns(FeaturizerWarning, match=r"1 parameter\(s\) of 2\+ dimensions are not tracked.*model\.extra_table"):
        featurizer = Featurizer(model, FeaturizerConfig(dim=512, correction="none"))
    assert featurizer.coverage.untracked == ("model.extra_table",)
    assert featurizer.manifest()["coverage"]["untracked_matrices"] == ["model.extra_table"]


def test_dim_is_bounded_by_the_model_and_warned_when_narrow():
    model = make_family("llama")
    entries = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    with pytest.raises(ParameterError, match=rf"^dim must be at most {entries:,}"):
        Featurizer(model, FeaturizerConfig(dim=entries + 1, correction="none"))
    with pytest.raises(ParameterError, match=r"^dim must be >= 1, not 0"):
        FeaturizerConfig(dim=0)
    with pytest.warns(FeaturizerWarning, match=r"dim 64: .*18%"):
        narrow = Featurizer(model, FeaturizerConfig(dim=64, correction="none", combine="sum"))
    assert narrow.featurize(random_batch(2)).vectors["uncorrected"].shape == (2, 64)


def save_family(out, family, texts):
    tokenizer = build_tokenizer(texts, out, model_max_length=10**30)
    model = make_family(family, vocab=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(str(out))


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_cli_run_as_a_user_says_the_share(tmp_path, family):
    """init, ingest corpus, ingest gradients --dim 256 --correction estimated on an MoE checkpoint
    (qwen2_moe's shared expert runs on flattened states; gpt-oss has transposed experts and biases)."""
    texts = sentences(24)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"s{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    save_family(tmp_path / "model", family, texts)
    db = tmp_path / "db"
    run_cli("init", db, "--model", tmp_path / "model")
    run_cli("ingest", "corpus", db, corpus)
    out = run_cli("ingest", "gradients", db, "--dim", 256, "--correction", "estimated", "--batch-size", 8).output
    line = re.search(r"tracked: .*", out).group(0)  # (after any progress bar of the model's loading)
    share = float(line.split()[1].rstrip("%")) / 100
    assert share >= SHARE and "not tracked" not in line and "warning" not in out
    manifest = json.loads((db / "manifest.json").read_text())
    cover = manifest["featurizer"]["coverage"]
    assert abs(cover["share"] - share) < 1e-3 and cover["untracked_matrices"] == []
    assert any("experts.gate_up_proj" in name for name in manifest["featurizer"]["tracked"])
    assert line in run_cli("info", db).output


def test_cli_dim_messages_name_the_flag(tmp_path):
    texts = sentences(12)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"s{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    save_family(tmp_path / "model", "mixtral", texts)
    db = tmp_path / "db"
    run_cli("init", db, "--model", tmp_path / "model")
    run_cli("ingest", "corpus", db, corpus)
    wide = run_cli("ingest", "gradients", db, "--dim", 60000, "--correction", "none", ok=False)
    assert wide.exit_code != 0 and wide.output.strip().splitlines()[-1].startswith("Error: --dim must be at most")
    narrow = run_cli("ingest", "gradients", db, "--dim", 64, "--correction", "none", "--combine", "sum")
    assert "warning: --dim 64: a projection this narrow" in narrow.output
