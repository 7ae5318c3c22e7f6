"""LoRA / PEFT checkpoints: a base model plus an adapter trained here, ingested and queried; the
stored vectors equal brute-force per-example gradients of the adapter weights, projected."""

from __future__ import annotations

import json
import shutil

import pyarrow.compute as pc
import pytest
import torch

peft = pytest.importorskip("peft")

from trackstar_db import connect  # noqa: E402
from trackstar_db.errors import TrackstarError  # noqa: E402
from trackstar_db.featurizer.config import FeaturizerConfig, Layout  # noqa: E402
from trackstar_db.featurizer.projection import projection_matrix  # noqa: E402
from trackstar_db.featurizer.task import per_example_loss  # noqa: E402
from trackstar_db.featurizer.tokenize import collate, encode_text, pad_id  # noqa: E402
from trackstar_db.gradients.fit import fit  # noqa: E402
from trackstar_db.gradients.worker import GradientJob, ingest_gradients  # noqa: E402
from trackstar_db.store.vectors import to_torch  # noqa: E402

CONFIG = FeaturizerConfig(dim=1024, correction="none")


def train_adapter(base_dir, out_dir, texts, steps: int = 6):
    """A LoRA adapter on the tiny GPT-2 (attention and MLP input projections), trained `steps` AdamW steps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True, dtype="float32")
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn", "c_fc"],
                           fan_in_fan_out=True, task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        batch = collate([encode_text(tokenizer, t, 32) for t in texts[step * 8:(step + 1) * 8]], pad_id(tokenizer))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, _ = per_example_loss(logits, batch["labels"])
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    model.save_pretrained(out_dir)  # adapter only; no tokenizer here (it comes from the base)
    return out_dir


@pytest.fixture(scope="module")
def lora_db(tiny_db_template, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    shutil.copytree(tiny_db_template / "model", root / "base")
    shutil.copytree(tiny_db_template / "db", root / "db")
    db = connect(root / "db")
    texts = db.table("examples", columns=["text"]).column("text").to_pylist()
    train_adapter(root / "base", root / "adapter", texts)
    db.set_model(root / "adapter")
    for split in ("train", "queries"):
        ingest_gradients(db, CONFIG, GradientJob(split, batch_size=16, device="cpu"), progress=False)
    return db


def test_only_the_adapter_matrices_are_tracked(lora_db):
    config = json.loads((lora_db.path.parent / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"].endswith("base")
    tracked = lora_db.manifest["featurizer"]["tracked"]
    n_layers = 1  # the tiny template model
    assert len(tracked) == 2 * 2 * n_layers  # (c_attn, c_fc) x (lora_A, lora_B)
    assert all((".lora_A." in n or ".lora_B." in n) and n.endswith(".weight") for n in tracked)


def test_vectors_match_brute_force_adapter_gradients(lora_db):
    from trackstar_db.models.load import open_model
    from trackstar_db.store.checkpoints import source

    model, tokenizer = open_model(source(lora_db))
    params = dict(model.named_parameters())
    layout = Layout.from_dict(lora_db.manifest["featurizer"]["layout"])
    table = lora_db.table("grads_train_uncorrected").sort_by("id").slice(0, 4)
    stored = to_torch(table.column("vector"), lora_db.manifest["gradient_tables"]["grads_train_uncorrected"]["dtype"])
    texts = dict(zip(*[lora_db.table("examples").column(c).to_pylist() for c in ("example_id", "text")]))
    for row, example_id in enumerate(table.column("id").to_pylist()):
        batch = collate([encode_text(tokenizer, texts[example_id], CONFIG.max_length)], pad_id(tokenizer))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, _ = per_example_loss(logits, batch["labels"])
        names = [b.name for b in layout.blocks]
        grads = torch.autograd.grad(loss[0], [params[n] for n in names])
        expected = torch.zeros(layout.dim)
        for block, g in zip(layout.blocks, grads):
            p_r = projection_matrix(CONFIG.seed, block.name, "row", block.k_r, g.shape[0])
            p_c = projection_matrix(CONFIG.seed, block.name, "col", block.k_c, g.shape[1])
            expected[block.offset: block.offset + block.size] += (p_r @ g.double().float() @ p_c.t()).flatten()
        assert float(expected.norm()) > 0
        assert float((stored[row] - expected).norm()) <= 1e-4 * float(expected.norm()), example_id


def test_fit_and_query(lora_db):
    fit(lora_db)
    query = lora_db.table("queries").to_pylist()[0]
    hits = lora_db.query(query["prompt"], query["target"], k=5)
    assert hits.column("method")[0].as_py() == "grad-cos"  # the best rung without an optimizer correction
    assert hits.filter(pc.field("kind") == "proponent").num_rows == 5
    scores = hits.filter(pc.field("kind") == "proponent").column("score").to_pylist()
    assert scores == sorted(scores, reverse=True) and all(-1.0001 <= s <= 1.0001 for s in scores)
    trak = lora_db.query(query["prompt"], query["target"], k=3, method="trak")
    assert trak.num_rows == 6


def test_estimated_correction_runs_on_an_adapter(lora_db, tiny_db_template, tmp_path):
    """No optimizer state: the default correction estimates the adapter's second moment from a sample."""
    shutil.copytree(tiny_db_template / "db", tmp_path / "db")
    db = connect(tmp_path / "db")
    db.set_model(lora_db.path.parent / "adapter")
    ingest_gradients(db, {"dim": 1024}, GradientJob("train", limit=8, estimate_sample=32, device="cpu"), progress=False)
    assert db.manifest["featurizer"]["config"]["correction"] == "estimated"
    vectors = to_torch(db.table("grads_train_corrected").column("vector"), "float32")
    assert vectors.shape == (8, Layout.from_dict(db.manifest["featurizer"]["layout"]).dim)
    assert bool(torch.isfinite(vectors).all()) and float(vectors.norm()) > 0


def test_missing_base_is_one_line(tmp_path, lora_db):
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_db.path.parent / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some-org/some-hub-model"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    from trackstar_db.models.load import load_adapter_model

    with pytest.raises(TrackstarError, match="not a local directory") as info:
        load_adapter_model(adapter)
    assert "\n" not in str(info.value)
