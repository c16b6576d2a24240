"""The fine-tuning run: load, prepare data, train (LoRA or full), evaluate, save.

One optimizer step takes `grad_accum` length-bucketed batches; its loss terms are divided by
the step's token counts, so the gradient is that of the whole step at once. The data order
of epoch e comes from `seed + e`, the depth decoder's frame choice from one saved generator,
so `resume` continues exactly where a checkpoint was taken. On CUDA the forward runs under
bfloat16 autocast with gradient checkpointing per decoder layer.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from csm.adapters import save_adapter
from csm.devices import default_device, parse_device, parse_dtype
from csm.finetune.batches import TrainingBatch, bucket, collate
from csm.finetune.codes import AudioFileCodeCache
from csm.finetune.dataset import Prepared, prepare, split_off
from csm.finetune.evaluate import EvalResult, eval_loss, inference_caches, write_samples
from csm.finetune.lora import add_lora, lora_weights
from csm.finetune.loss import loss_terms, token_counts
from csm.finetune.options import FinetuneOptions
from csm.finetune.resume import Position, load_checkpoint, save_checkpoint
from csm.generator import Generator
from csm.loading import load_csm
from csm.mimi import Mimi
from csm.model import CSM
from csm.text import load_tokenizer
from csm.watermark import Watermarker

try:  # Unix only: on Windows the log has no CPU memory figure
    import resource
except ImportError:
    resource = None

CHECKPOINT = "checkpoint"
LOG = "train_log.jsonl"
SAMPLES = "samples"


def train(data: str | Path, output: str | Path, **options) -> Path:
    """Fine-tune CSM on `data` (a JSONL manifest or a folder of clips) into `output`.

    The keywords are the fields of `FinetuneOptions` (the options of `csm finetune`). LoRA
    runs leave a PEFT adapter in `output` (load it with `load_csm_1b(adapter=output)`), full
    runs an original-layout checkpoint (`load_csm_1b(model=output)`). Returns `output`.
    """
    run(FinetuneOptions(data=data, output=output, **options))
    return Path(output).expanduser()


def run(options: FinetuneOptions) -> None:
    device = parse_device(options.device) if options.device else default_device()
    output = options.output
    output.mkdir(parents=True, exist_ok=True)
    mimi = Mimi.from_pretrained(options.mimi, device=device)
    tokenizer = load_tokenizer(options.tokenizer, model_source=options.model)
    model = _load_model(options, device)
    cache = AudioFileCodeCache(mimi, options.cache_dir)
    train_data, eval_data = _datasets(options, cache, tokenizer, model.max_seq_len)
    trainer = _Trainer(options, model, train_data, eval_data, device, output)
    if eval_data is not None and options.samples:
        trainer.sampler = _Sampler(options, model, mimi, tokenizer, eval_data, device, output)
    trainer.train()
    _save_result(options, model, tokenizer, output)


def _load_model(options: FinetuneOptions, device: torch.device) -> CSM:
    cuda = device.type == "cuda"
    default = torch.bfloat16 if cuda and not options.full else torch.float32
    dtype = parse_dtype(options.dtype) if options.dtype else default
    model = load_csm(options.model, device=device, dtype=dtype)
    if options.full:
        model.requires_grad_(True)
    else:
        generator = torch.Generator().manual_seed(options.seed)
        add_lora(model, options.targets, options.lora_rank, options.alpha, generator)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(".lora_" in name)
    if cuda:
        for llama in (model.backbone, model.decoder):
            for layer in llama.layers:
                layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    return model.train()


def _datasets(options: FinetuneOptions, cache, tokenizer, max_positions: int) -> tuple[Prepared, Prepared | None]:
    train = prepare(options.data, cache, tokenizer, max_positions, options.on_error)
    if options.eval is not None:
        return train, prepare(
            options.eval, cache, tokenizer, max_positions, options.on_error, desc="encoding eval audio"
        )
    if options.eval_split is not None:
        return split_off(train, options.eval_split, options.seed)
    return train, None


class _Trainer:
    def __init__(self, options, model: CSM, train: Prepared, evaluation: Prepared | None, device, output: Path):
        self.options, self.model, self.device, self.output = options, model, device, output
        self.examples = train.examples
        self.evaluation = evaluation
        self.sampler: _Sampler | None = None
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=options.learning_rate, weight_decay=options.weight_decay)
        lengths = [len(example) for example in self.examples]
        self.batches_per_epoch = len(bucket(lengths, options.batch_frames, torch.Generator().manual_seed(0)))
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / options.grad_accum)
        self.total_steps = options.steps or options.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(options.warmup, self.total_steps))
        self.selection = torch.Generator().manual_seed(options.seed)
        self.position = Position()
        self.autocast = (
            functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
            if device.type == "cuda"
            else contextlib.nullcontext
        )
        if options.resume is not None:
            state, self.position = load_checkpoint(
                options.resume, model, self.optimizer, self.scheduler, options.describe()
            )
            self.selection.set_state(state)

    def train(self) -> None:
        log = (self.output / LOG).open("a")
        bar = tqdm(total=self.total_steps, initial=self.position.step, desc="training", unit="step", file=sys.stderr)
        before, completed = self.selection.get_state(), True
        try:
            with log, bar:
                while self.position.step < self.total_steps:
                    before, completed = self.selection.get_state(), False
                    record = self._step()
                    completed = True
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                    step = self.position.step
                    if self.options.eval_every and step % self.options.eval_every == 0 and step < self.total_steps:
                        record.update(self._evaluate())
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    if self.options.save_every and step % self.options.save_every == 0:
                        self._save()
                if self.evaluation is not None:
                    log.write(json.dumps({"step": self.position.step, **self._evaluate()}) + "\n")
        except KeyboardInterrupt:
            if not completed:  # the interrupted step starts again, with the same frame choice
                self.selection.set_state(before)
            self._save(interrupted=True)
            raise
        finally:
            self.model.eval()

    def _step(self) -> dict:
        options, position = self.options, self.position
        started = time.perf_counter()
        batches = self._step_batches(position.epoch, position.epoch_step)
        num_codebooks = self.model.config.audio_num_codebooks
        counts = [token_counts(batch, num_codebooks) for batch in batches]
        backbone_tokens, decoder_tokens = (sum(column) for column in zip(*counts, strict=True))
        backbone = decoder = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        for batch in batches:
            with self.autocast():
                terms = loss_terms(self.model, batch.to(self.device))
            loss = terms.loss(backbone_tokens, decoder_tokens, options.c0_weight, options.decoder_weight)
            loss.backward()
            backbone += float(terms.backbone_sum.detach()) / backbone_tokens
            decoder += float(terms.decoder_sum.detach()) / decoder_tokens
        torch.nn.utils.clip_grad_norm_(self.parameters, options.max_grad_norm)
        learning_rate = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        position.step += 1
        position.epoch_step += 1
        if position.epoch_step == self.steps_per_epoch:
            position.epoch, position.epoch_step = position.epoch + 1, 0
        elapsed = time.perf_counter() - started
        return {
            "step": position.step,
            "epoch": position.epoch,
            "loss": options.c0_weight * backbone + options.decoder_weight * decoder,
            "backbone_loss": backbone,
            "decoder_loss": decoder,
            "lr": learning_rate,
            "tokens_per_second": sum(batch.num_positions for batch in batches) / elapsed,
            "memory_mb": _peak_memory_mb(self.device),
        }

    def _step_batches(self, epoch: int, epoch_step: int) -> list[TrainingBatch]:
        lengths = [len(example) for example in self.examples]
        groups = bucket(lengths, self.options.batch_frames, torch.Generator().manual_seed(self.options.seed + epoch))
        accum = self.options.grad_accum
        chosen = groups[epoch_step * accum : (epoch_step + 1) * accum]
        return [
            collate([self.examples[index] for index in group], self.options.decoder_frame_ratio, self.selection)
            for group in chosen
        ]

    def _evaluate(self) -> dict:
        self.model.eval()
        result: EvalResult = eval_loss(
            self.model, self.evaluation.examples, self.options.batch_frames, self.device, self.autocast
        )
        record = {
            "eval_loss": result.loss,
            "eval_backbone_loss": result.backbone_loss,
            "eval_decoder_loss": result.decoder_loss,
        }
        if self.sampler is not None:
            record["end_of_speech_fraction"] = self.sampler.sample(self.position.step)
        self.model.train()
        return record

    def _save(self, interrupted: bool = False) -> None:
        folder = self.output / CHECKPOINT
        save_checkpoint(
            folder,
            self.model,
            self.optimizer,
            self.scheduler,
            self.selection.get_state(),
            replace(self.position),
            self.options.describe(),
        )
        if interrupted:
            print(
                f"csm: saved a resumable checkpoint at step {self.position.step}: continue with --resume {folder}",
                file=sys.stderr,
            )


class _Sampler:
    """Writes watermarked samples of eval prompts and measures how many end by themselves."""

    def __init__(self, options, model, mimi, tokenizer, evaluation: Prepared, device, output: Path):
        self.options, self.model, self.mimi, self.tokenizer = options, model, mimi, tokenizer
        self.conversations = evaluation.conversations[: options.samples]
        self.watermarker = Watermarker.from_pretrained(options.watermarker, device=device)
        self.folder = output / SAMPLES

    def sample(self, step: int) -> float:
        with inference_caches(self.model):
            generator = Generator(self.model, self.mimi, self.tokenizer, self.watermarker)
            return write_samples(
                generator, self.conversations, self.folder, step, self.options.sample_seconds, self.options.seed
            )


def _schedule(warmup: int, total: int):
    """Linear warm-up over `warmup` steps, then cosine decay to zero at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _peak_memory_mb(device: torch.device) -> float | None:
    """The peak memory of the run: the GPU's on CUDA, else the process's resident set
    (None where the OS does not report it)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if resource is None:
        return None
    return maxrss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, sys.platform)


def maxrss_mb(maxrss: int, platform: str) -> float:
    """`getrusage`'s `ru_maxrss` in MiB: macOS reports it in bytes, Linux and the BSDs in KiB."""
    return maxrss / 2**20 if platform == "darwin" else maxrss / 1024


def _save_result(options: FinetuneOptions, model: CSM, tokenizer, output: Path) -> None:
    if options.full:
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
        save_file(state, str(output / "model.safetensors"))
        (output / "config.json").write_text(json.dumps(model.config.to_dict()))
        tokenizer.save(str(output / "tokenizer.json"))
    else:
        adapter = lora_weights(model)
        save_adapter(
            adapter, model.config, output, rank=options.lora_rank, alpha=options.alpha, base_model=options.model
        )
