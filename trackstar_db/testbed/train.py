"""Pretrain a small causal LM from scratch on a text corpus, keeping its optimizer state.

The result is a standard transformers checkpoint directory (config.json, model.safetensors,
tokenizer files) plus optimizer.safetensors (trackstar_db.featurizer.optimizer_state: AdamW moments and
the final learning rate, which tail-patch reuses) and train_info.json (config, losses, timing).
The learning rate warms up linearly, then follows a cosine down to `final_lr` (> 0).
Also here: fact accuracy by greedy decoding, and its split by frequency bucket; and, for
Simfluence (trackstar_db.simfluence), short recorded runs (`train_recorded`: a step callback sees
each batch's example indices) and `ProbeLosses`, the target loss of fixed probe queries.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from trackstar_db.devices import DEVICE
from trackstar_db.errors import ParameterError
from trackstar_db.featurizer import optimizer_state
from trackstar_db.featurizer.tokenize import (
    IGNORE,
    collate,
    encode_query,
    encode_text,
    pad_id,
)
from trackstar_db.featurizer.task import per_example_loss
from trackstar_db.models.load import open_weights, save_model
from trackstar_db.option_checks import COUNT, NON_NEGATIVE, POSITIVE_NUMBER, Choice, check, check_fields, ruled
from trackstar_db.progress import bar as progress_bar

from .vocab import build_tokenizer


@dataclass
class TrainConfig:
    """Architecture and optimisation of a from-scratch pretraining run."""

    architecture: str = ruled(Choice(("gpt2", "llama")), "gpt2")
    n_layer: int = ruled(COUNT, 2)
    d_model: int = ruled(COUNT, 128)
    n_head: int = ruled(COUNT, 4)
    max_length: int = ruled(COUNT, 32)  # tokens per example (and position embeddings)
    epochs: int = ruled(COUNT, 20)
    max_steps: int | None = ruled(COUNT, None)  # stop early after this many optimizer steps
    batch_size: int = ruled(COUNT, 64)
    lr: float = ruled(POSITIVE_NUMBER, 3e-3)
    final_lr: float = ruled(POSITIVE_NUMBER, 3e-4)  # learning rate at the last step (cosine end point; <= lr)
    weight_decay: float = 0.01
    warmup: int = ruled(NON_NEGATIVE, 50)  # linear warm-up steps
    seed: int = 0
    threads: int | None = ruled(COUNT, None)  # torch CPU threads while training; None = torch's current setting
    device: str = ruled(DEVICE, "cpu")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.final_lr > self.lr:
            raise ParameterError("final_lr", f"must be at most lr ({self.lr:g}), not {self.final_lr:g}", others=("lr",))
        if self.d_model % self.n_head:
            raise ParameterError("d_model", f"must be divisible by n_head ({self.n_head}), not {self.d_model}",
                                 others=("n_head",))


@dataclass
class TrainResult:
    model_dir: Path
    steps: int
    first_loss: float    # mean loss over the first epoch
    final_loss: float    # mean loss over the last epoch
    final_lr: float
    wall_time_s: float


def build_model(config: TrainConfig, tokenizer) -> torch.nn.Module:
    """A randomly initialised GPT-2 or Llama causal LM sized by `config`."""
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id(tokenizer))
    if config.architecture == "gpt2":
        hf = GPT2Config(n_layer=config.n_layer, n_embd=config.d_model, n_head=config.n_head,
                        n_positions=config.max_length, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
        return GPT2LMHeadModel(hf)
    hf = LlamaConfig(num_hidden_layers=config.n_layer, hidden_size=config.d_model,
                     num_attention_heads=config.n_head, num_key_value_heads=config.n_head,
                     intermediate_size=4 * config.d_model, max_position_embeddings=config.max_length, **ids)
    return LlamaForCausalLM(hf)


def lr_factor(step: int, total: int, config: TrainConfig) -> float:
    """Multiplier of config.lr before optimizer step `step` (0-based); equals final_lr/lr from `total` - 1 on."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    floor = config.final_lr / config.lr
    progress = min(1.0, (step - config.warmup) / max(1, total - 1 - config.warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def train_model(texts: Sequence[str], out_dir: str | Path, config: TrainConfig, tokenizer=None,
                progress: bool | None = None, checkpoints: int = 0) -> TrainResult:
    """Train a fresh model on `texts` (next-token loss on every token) and save it to `out_dir`.

    checkpoints > 0 also keeps that many intermediate checkpoints, evenly spaced, each a complete
    checkpoint directory with its optimizer state and learning rate (out_dir/checkpoints/step-NNNNNN;
    for TracIn-CP, whose last checkpoint is out_dir itself)."""
    if not texts:
        raise ValueError("train_model: no training texts")
    check("checkpoints", NON_NEGATIVE, checkpoints)
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _train(texts, Path(out_dir), config, tokenizer, progress, checkpoints)
    finally:
        torch.set_num_threads(threads)


def _train(texts: Sequence[str], out: Path, config: TrainConfig, tokenizer, progress: bool,
           checkpoints: int = 0) -> TrainResult:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    tokenizer = tokenizer or build_tokenizer(texts, model_max_length=config.max_length)
    model = build_model(config, tokenizer).to(config.device)
    encoded = [encode_text(tokenizer, text, config.max_length) for text in texts]
    batches_per_epoch = math.ceil(len(encoded) / config.batch_size)
    total = batches_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    keep = {round(total * j / (checkpoints + 1)) for j in range(1, checkpoints + 1)} - {0, total}
    on_step = None
    if keep:
        def on_step(step, indices, loss, lr, model, optimizer):
            if step in keep:
                save_checkpoint(model, tokenizer, optimizer, out / "checkpoints" / f"step-{step:06d}")
    start = time.perf_counter()
    optimizer, step, epoch_losses = _optimize(model, encoded, config, pad_id(tokenizer), total, config.seed, progress,
                                              on_step)
    wall = time.perf_counter() - start

    save_model(model, tokenizer, out)
    state = optimizer_state.from_torch_adam(optimizer, dict(model.named_parameters()), kind="adamw")
    optimizer_state.save(state, out)
    result = TrainResult(out, step, epoch_losses[0], epoch_losses[-1], state.lr, wall)
    info = {"config": asdict(config), "steps": step, "epochs_run": len(epoch_losses), "n_examples": len(texts),
            "epoch_losses": epoch_losses, "first_loss": result.first_loss, "final_loss": result.final_loss,
            "final_lr": state.lr, "wall_time_s": wall, "torch_threads": torch.get_num_threads()}
    (out / "train_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return result


def _optimize(model, encoded: list, config: TrainConfig, pad: int, total: int, order_seed: int, progress: bool | None,
              on_step: Callable | None = None):
    """AdamW for `total` steps over random permutations of `encoded` (a new one each epoch, drawn
    from `order_seed`). After each step, on_step(step, batch_indices, loss, lr, model, optimizer) if given.
    Returns (optimizer, steps, mean loss per epoch)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, config))
    generator = torch.Generator().manual_seed(order_seed)

    model.train()
    step, epoch_losses = 0, []
    bar = progress_bar(total=total, desc="train", unit="step", progress=progress)  # progress.py: a terminal or asked
    while step < total:
        order = torch.randperm(len(encoded), generator=generator).tolist()
        losses = []
        for first in range(0, len(order), config.batch_size):
            if step == total:
                break
            indices = order[first: first + config.batch_size]
            batch = collate([encoded[i] for i in indices], pad)
            batch = {k: v.to(config.device) for k, v in batch.items()}
            loss = model(**batch).loss  # mean over all labelled tokens of the batch
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            schedule.step()
            step += 1
            losses.append(loss.item())
            if on_step is not None:
                on_step(step, indices, losses[-1], lr, model, optimizer)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", epoch=len(epoch_losses))
        epoch_losses.append(sum(losses) / len(losses))
    bar.close()
    return optimizer, step, epoch_losses


def save_checkpoint(model, tokenizer, optimizer, path: Path) -> Path:
    """A complete checkpoint directory: weights, tokenizer, optimizer state (with the next step's lr)."""
    path.mkdir(parents=True, exist_ok=True)
    save_model(model, tokenizer, path)
    optimizer_state.save(optimizer_state.from_torch_adam(optimizer, dict(model.named_parameters()), kind="adamw"), path)
    return path


class ProbeLosses:
    """Target loss of fixed probe queries (tokenize.encode_query) under a model: call it with the model."""

    def __init__(self, tokenizer, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 256,
                 device: str = "cpu"):
        items = [encode_query(tokenizer, p, t) for p, t in zip(prompts, targets)]
        self.batches = [collate(items[i: i + batch_size], pad_id(tokenizer)) for i in range(0, len(items), batch_size)]
        self.device = device

    @torch.no_grad()
    def __call__(self, model) -> list[float]:
        was_training = model.training
        model.eval()
        out: list[float] = []
        for batch in self.batches:
            logits = model(input_ids=batch["input_ids"].to(self.device),
                           attention_mask=batch["attention_mask"].to(self.device)).logits
            out += per_example_loss(logits, batch["labels"].to(self.device))[0].tolist()
        model.train(was_training)
        return out


def train_recorded(texts: Sequence[str], config: TrainConfig, tokenizer, order_seed: int, on_step: Callable,
                   init_dir: str | Path | None = None, progress: bool = False):
    """One short run for Simfluence: a model initialised from `config.seed` (the same for every run;
    or the checkpoint in `init_dir`), trained for config.max_steps steps on `texts` in the order drawn
    from `order_seed`, calling on_step(step, batch_indices, loss, lr, model, optimizer) after each step and
    once before the first (step 0: no batch, loss nan, lr 0, optimizer None). Nothing is saved. Returns the trained model."""
    if not texts or not config.max_steps:
        raise ValueError("train_recorded: needs texts and config.max_steps")
    torch.manual_seed(config.seed)
    if init_dir is not None:
        model = open_weights(init_dir)
    else:
        model = build_model(config, tokenizer)
    model = model.to(config.device)
    on_step(0, [], float("nan"), 0.0, model, None)
    encoded = [encode_text(tokenizer, text, config.max_length) for text in texts]
    _optimize(model, encoded, config, pad_id(tokenizer), config.max_steps, order_seed, progress, on_step)
    return model


@torch.no_grad()
def fact_accuracy(model, tokenizer, prompts: Sequence[str], targets: Sequence[str],
                  batch_size: int = 64) -> list[bool]:
    """Whether greedy decoding after each prompt reproduces its target tokens exactly.

    Encoded as tokenize.encode_query. With teacher forcing, the greedy continuation equals the
    target iff the argmax at every target position is the target token, so one forward pass per
    batch decides it: logits [batch, tokens, vocab] -> argmax [batch, tokens].
    """
    if len(prompts) != len(targets):
        raise ValueError(f"fact_accuracy: {len(prompts)} prompts but {len(targets)} targets")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct: list[bool] = []
    for first in range(0, len(prompts), batch_size):
        items = [encode_query(tokenizer, p, t) for p, t in
                 zip(prompts[first: first + batch_size], targets[first: first + batch_size])]
        batch = collate(items, pad_id(tokenizer))
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        predicted = logits[:, :-1].argmax(dim=-1).cpu()  # [batch, tokens-1], predicts position t+1
        labels = batch["labels"][:, 1:]
        scored = labels != IGNORE
        correct += ((predicted == labels) | ~scored).all(dim=1).tolist()
    model.train(was_training)
    return correct

