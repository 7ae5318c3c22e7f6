"""transformers Trainer checkpoints: optimizer.pt read safely and mapped to parameter names, and
the TrackstarCallback's optimizer.safetensors, give the same state and the same vectors.

A tiny GPT-2 (biases and layer norms, so the Trainer splits its parameters into a decay and a
no-decay group) trains a few steps on CPU with the callback; then:
- load_hf_trainer(optimizer.pt) equals the state captured from the live optimizer by name;
- `init --model checkpoint-N` with only optimizer.pt, and with only optimizer.safetensors,
  give identical gradient vectors (adam-factored by default);
- Adafactor checkpoints are read too; a state for another model is refused in one line."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from tiny_checkpoints import save_checkpoint, sentences
from trackstar_db.cli import main
from trackstar_db.featurizer import optimizer_state as opt

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


class Texts(torch.utils.data.Dataset):
    def __init__(self, tokenizer, texts, length=12):
        self.rows = []
        for text in texts:
            ids = ([tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"])[:length]
            ids += [tokenizer.pad_token_id] * (length - len(ids))
            self.rows.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def train(root, optim="adamw_torch", steps=3):
    from trackstar_db.integrations.hf_trainer import TrackstarCallback

    texts = sentences(24)
    model, tokenizer = save_checkpoint(root / "init", texts, family="gpt2", context=32)
    args = transformers.TrainingArguments(
        output_dir=str(root / "out"), max_steps=steps, save_steps=steps, save_strategy="steps",
        per_device_train_batch_size=8, learning_rate=1e-3, weight_decay=0.01, optim=optim,
        lr_scheduler_type="linear", warmup_steps=1, logging_steps=1, report_to=[], use_cpu=True,
        dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Texts(tokenizer, texts),
                                   processing_class=tokenizer, callbacks=[TrackstarCallback()])
    trainer.train()
    return trainer, root / "out" / f"checkpoint-{steps}", texts


@pytest.fixture(scope="module")
def adam_run(tmp_path_factory):
    torch.set_num_threads(1)
    return train(tmp_path_factory.mktemp("hf"))


def test_optimizer_pt_maps_indices_to_names(adam_run):
    trainer, checkpoint, _ = adam_run
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "optimizer.safetensors").is_file()
    groups = trainer.optimizer.param_groups
    assert len(groups) == 2 and all(len(g["params"]) for g in groups)  # decay and no-decay groups
    from_pt = opt.load_hf_trainer(checkpoint)
    live = opt.from_torch(trainer.optimizer, dict(trainer.model.named_parameters()))
    assert from_pt.optimizer == "adamw" and from_pt.step == live.step == 3
    assert sorted(from_pt.tensors) == sorted(live.tensors)
    for key, tensor in live.tensors.items():
        assert torch.equal(from_pt.tensors[key], tensor), key
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    assert from_pt.lr == pytest.approx([e["learning_rate"] for e in history if "learning_rate" in e][-1])
    callback = opt.load(checkpoint / "optimizer.safetensors")
    assert sorted(callback.tensors) == sorted(live.tensors)
    assert callback.lr == pytest.approx(trainer.lr_scheduler.get_last_lr()[0])
    assert (callback.beta1, callback.beta2, callback.eps) == (from_pt.beta1, from_pt.beta2, from_pt.eps)


def _vectors(db):
    import trackstar_db

    rows = trackstar_db.connect(db).table("grads_train_corrected", columns=["id", "vector"]).to_pylist()
    return {r["id"]: r["vector"] for r in rows}


def test_init_with_optimizer_pt_equals_the_safetensors_state(adam_run, tmp_path):
    _, checkpoint, texts = adam_run
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:8]))
    vectors = {}
    for keep in ("optimizer.pt", "optimizer.safetensors"):
        model = tmp_path / keep / "checkpoint-3"
        shutil.copytree(checkpoint, model)
        (model / ({"optimizer.pt", "optimizer.safetensors"} - {keep}).pop()).unlink()
        db = tmp_path / keep / "db"
        run("init", db, "--model", model)
        manifest = json.loads((db / "manifest.json").read_text())
        assert manifest["model"]["optimizer"] == "adamw" and manifest["model"]["optimizer_step"] == 3
        assert manifest["model"]["optimizer_lr"] == pytest.approx(opt.load(model).lr)
        assert manifest["model"]["optimizer_state"].endswith(keep)
        run("ingest", "corpus", db, corpus)
        out = run("ingest", "gradients", db, "--dim", 1024, "--device", "cpu", "--no-uncorrected").output
        assert "correction: adam-factored" in out
        vectors[keep] = _vectors(db)
    assert vectors["optimizer.pt"].keys() == vectors["optimizer.safetensors"].keys()
    for key, vector in vectors["optimizer.pt"].items():
        assert vector == pytest.approx(vectors["optimizer.safetensors"][key], rel=1e-5, abs=1e-7)


def test_adafactor_checkpoint_is_read(tmp_path):
    torch.set_num_threads(1)
    trainer, checkpoint, texts = train(tmp_path, optim="adafactor", steps=2)
    state = opt.load_hf_trainer(checkpoint)
    assert state.optimizer == "adafactor"
    live = opt.from_torch(trainer.optimizer, dict(trainer.model.named_parameters()))
    assert live.optimizer == "adafactor" and sorted(state.tensors) == sorted(live.tensors)
    name = "transformer.h.0.attn.c_attn.weight"
    rows, cols = dict(trainer.model.named_parameters())[name].shape
    assert state.tensors[f"exp_avg_sq_row.{name}"].shape == (rows,)
    assert state.tensors[f"exp_avg_sq_col.{name}"].shape == (cols,)
    (checkpoint / "optimizer.safetensors").unlink()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:4]))
    db = tmp_path / "db"
    run("init", db, "--model", checkpoint)
    run("ingest", "corpus", db, corpus)
    assert "correction: adafactor" in run("ingest", "gradients", db, "--dim", 1024, "--device", "cpu").output


def test_state_of_another_model_is_refused_in_one_line(adam_run, tmp_path):
    _, checkpoint, texts = adam_run
    other = tmp_path / "other"
    save_checkpoint(other, texts, family="llama", context=32)
    shutil.copy(checkpoint / "optimizer.pt", other / "optimizer.pt")
    result = run("init", tmp_path / "db", "--model", other, ok=False)
    assert result.exit_code != 0
    assert "optimizer.pt" in result.output and len(result.output.strip().splitlines()) == 1
    garbage = tmp_path / "garbage" 
    shutil.copytree(checkpoint, garbage)
    (garbage / "optimizer.safetensors").unlink()
    (garbage / "optimizer.pt").write_bytes(b"not a torch file")
    result = run("init", tmp_path / "db2", "--model", garbage, ok=False)
    assert "not a readable torch optimizer state" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_format_is_sniffed_by_name_then_content(tmp_path):
    """A safetensors file whose 8-byte header length starts with 0x80 (a pickle's first byte) is
    still read as safetensors; a torch file under another name is read as torch, safely."""
    from safetensors.torch import save_file

    path = tmp_path / "optimizer.safetensors"
    tensors = {"exp_avg_sq.w": torch.ones(2, 2), "exp_avg.w": torch.zeros(2, 2)}
    for pad in range(300):  # metadata of growing length until the header length's low byte is 0x80
        save_file(tensors, str(path), metadata={"optimizer": "adamw", "step": "1", "lr": "0.001", "pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert opt._is_safetensors(path) and opt.load(path).optimizer == "adamw"
    torch.save({"state": {}, "param_groups": []}, tmp_path / "renamed.safetensors")
    assert not opt._is_safetensors(tmp_path / "renamed.safetensors")
