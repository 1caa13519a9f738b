"""Training with R2Gen's recipe and RIHA's loss, model selection on validation BLEU-4, resume, fine-tuning, evaluation.

The recipe (DESIGN, "Training"): Adam with amsgrad, learning rate 5e-5 for the ResNet and 1e-4 for everything else,
weight decay 5e-5, gradients clipped to 0.1 by value (R2Gen's `clip_grad_value_`), StepLR per epoch; IU-Xray batch
16 for 100 epochs with StepLR(50, 0.1), MIMIC-CXR batch 64 for 30 epochs with StepLR(1, 0.8). After each validation
the model with the best validation BLEU-4 so far is written to the output checkpoint, with its validation BLEU-1..4
and clinical efficacy; `evaluate_model` gives every metric on any split.

Resuming: beside the output checkpoint, `<checkpoint>.train-state` holds what the checkpoint does not: the latest
weights (the checkpoint holds the best), optimizer, scheduler, epoch, best score, history and the random state. It is
rewritten after every validation (every epoch by default); `--resume CHECKPOINT` continues from the last one exactly
as the uninterrupted run would have.

Several GPUs: started under `torchrun`, each process trains on its share of every epoch (DistributedSampler) inside
DistributedDataParallel; validation is shared out too and scored on rank 0, which alone writes files.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as torch_dist
from pycocoevalcap.bleu.bleu import Bleu
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from riha_model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from riha_model.config import RihaConfig
from riha_model.data import TEXT_SETTINGS, Collate, ReportDataset, StudySet, build_tokenizer, read_studies
from riha_model.errors import RihaModelError
from riha_model.metrics import clinical_efficacy, nlg_metrics
from riha_model.model import RIHA
from riha_model.text import Tokenizer

log = logging.getLogger(__name__)

LR_HEAD = 1e-4
LR_BACKBONE = LR_HEAD * 0.5  # the reference's 5e-5; kept as a ratio so a given --lr keeps it
WEIGHT_DECAY = 5e-5
GRAD_CLIP_VALUE = 0.1
SELECTION_METRIC = "BLEU_4"
STATE_SUFFIX = ".train-state"
STATE_FORMAT = 1


@dataclass(frozen=True)
class Recipe:
    """Batch size, epochs and StepLR schedule of one dataset in the reference's training."""

    batch_size: int
    epochs: int
    lr_step: int
    lr_gamma: float


RECIPES = {"iu_xray": Recipe(batch_size=16, epochs=100, lr_step=50, lr_gamma=0.1),
           "mimic_cxr": Recipe(batch_size=64, epochs=30, lr_step=1, lr_gamma=0.8)}

# The `tiny` preset on phantom studies at 64 px: the training that the learning tests show reads the drawn findings,
# about three CPU-minutes for 240 phantoms on this 2-core machine (the demo and the retrain tests use it too). A
# higher, flat learning rate for every part, and no random crop or flip: the flip mirrors a sided finding while its
# report keeps the side, and on two cores there is no time to learn through the crop's jitter. The last epoch is
# kept: validation BLEU-4 peaks early, at epochs that write the most frequent report whatever the image shows.
PHANTOM_TRAINING = {"preset": "tiny", "epochs": 24, "batch_size": 16, "lr": 1e-3, "lr_backbone": 1e-3,
                    "lr_step": 1000, "augment": False, "keep": "last", "config_overrides": {"image_size": 64}}


@dataclass
class TrainResult:
    """Where the kept model went (the best epoch, or the last with keep="last"), how good it was on validation, and
    the per-epoch history."""

    checkpoint: Path
    sha256: str
    best_epoch: int
    best_metrics: dict
    history: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- devices, processes

@dataclass(frozen=True)
class Processes:
    """This process's place among the torchrun processes (rank 0 of 1 when started alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_processes() -> Processes:
    """Join the torchrun process group when RANK / WORLD_SIZE say there is one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Processes()
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Processes(rank=torch_dist.get_rank(), world_size=torch_dist.get_world_size(),
                     local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(device: str, processes: Processes = Processes()) -> torch.device:
    """"auto": this process's GPU if there is one, else the CPU; "cpu" and "cuda:N" as given."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", processes.local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as exc:
        raise RihaModelError(f"Device {device!r} is not a device name; use auto, cpu or cuda:N.") from exc
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise RihaModelError(f"Device {device!r} was asked for but no CUDA GPU is available; use --device cpu.")
        if (chosen.index or 0) >= torch.cuda.device_count():
            raise RihaModelError(f"Device {device!r} does not exist: this machine has {torch.cuda.device_count()} "
                                 "GPU(s).")
    elif chosen.type != "cpu":
        raise RihaModelError(f"Device {device!r} is not supported; use auto, cpu or cuda:N.")
    return chosen


def autocast(device: torch.device):
    """bf16 autocast on CUDA (no loss scaling needed), full precision on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def show_progress() -> bool:
    """A progress bar on a terminal; plain log lines otherwise."""
    return sys.stderr.isatty()


# ----------------------------------------------------------------------------------------------- generation, scoring

def generate_texts(model: RIHA, tokenizer: Tokenizer, dataset: ReportDataset, batch_size: int,
                   device: torch.device, processes: Processes = Processes(), desc: str = "generate"
                   ) -> tuple[list[str], list[str]]:
    """(references, hypotheses) over `dataset` in its order; each process decodes every world_size-th study.

    References are the decoded, truncated target ids, as R2Gen scores them (out-of-vocabulary words are '<unk>').
    """
    indices = list(range(processes.rank, len(dataset), processes.world_size))
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                        collate_fn=Collate(tokenizer, model.config))
    references, hypotheses = [], []
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not show_progress()):
        batch = batch.to(device)
        with torch.inference_mode(), autocast(device):
            generated = model.generate(batch.images, batch.view_mask, batch.view_ids)
        hypotheses.extend(tokenizer.decode(ids) for ids in generated)
        references.extend(tokenizer.decode(ids[1:]) for ids in batch.tokens.tolist())
    if processes.distributed:
        gathered = [None] * processes.world_size
        torch_dist.all_gather_object(gathered, (indices, references, hypotheses))
        order = {}
        for shard_indices, shard_references, shard_hypotheses in gathered:
            order.update(zip(shard_indices, zip(shard_references, shard_hypotheses)))
        references = [order[index][0] for index in range(len(dataset))]
        hypotheses = [order[index][1] for index in range(len(dataset))]
    return references, hypotheses


def validation_scores(references: Sequence[str], hypotheses: Sequence[str]) -> dict:
    """BLEU-1..4 (the scorer metrics.nlg_metrics uses) and clinical efficacy: what every validation needs and can
    afford. METEOR is left to `evaluate_model`, since starting its Java process costs seconds each time."""
    scores, _ = Bleu(4).compute_score({i: [text] for i, text in enumerate(references)},
                                      {i: [text] for i, text in enumerate(hypotheses)}, verbose=0)
    return {**{f"BLEU_{n}": float(value) for n, value in enumerate(scores, start=1)},
            "clinical_efficacy": clinical_efficacy(list(references), list(hypotheses))}


def evaluate_model(checkpoint: str | os.PathLike, data: str | os.PathLike, images: str | os.PathLike | None = None,
                   split: str = "test", batch_size: int = 16, device: str = "auto") -> dict:
    """Scores of a checkpoint's reports on one split: nlg_metrics keys, "clinical_efficacy" and "studies"."""
    device_ = resolve_device(device)
    loaded = load_checkpoint(checkpoint, map_location=device_)
    tokenizer = Tokenizer.from_dict(loaded.tokenizer)
    studies = read_studies(data, images, dataset=tokenizer.dataset).split(split)
    dataset = ReportDataset(studies, tokenizer, loaded.config)
    references, hypotheses = generate_texts(loaded.model, tokenizer, dataset, batch_size, device_, desc=split)
    return {**nlg_metrics(references, hypotheses), "clinical_efficacy": clinical_efficacy(references, hypotheses),
            "studies": len(studies)}


# ----------------------------------------------------------------------------------------------- training

def train_model(data: str | os.PathLike, out: str | os.PathLike, images: str | os.PathLike | None = None,
                preset: str = "tiny", epochs: int | None = None, batch_size: int | None = None,
                lr: float | None = None, lr_backbone: float | None = None, lr_step: int | None = None,
                lr_gamma: float | None = None, seed: int = 0, resume: str | os.PathLike | None = None,
                init: str | os.PathLike | None = None, device: str = "auto", config_overrides: dict | None = None,
                validate_every: int = 1, val_split: str = "val", num_workers: int | None = None,
                dataset: str | None = None, augment: bool = True, keep: str = "best") -> TrainResult:
    """Train a RIHA model on a dataset and write the best (validation BLEU-4) model to `out`.

    - Fresh: the `preset` configuration (plus `config_overrides`), a vocabulary built from the training split.
    - `init`: fine-tune an existing checkpoint, keeping its configuration and vocabulary; its SHA-256 is recorded
      as the parent.
    - `resume`: continue an interrupted run from `resume` and the training state stored beside it.
    Unset epochs / batch size / learning rates / StepLR come from the dataset's reference recipe; a given `lr`
    without `lr_backbone` keeps the recipe's ratio (the ResNet at half the rate). `augment=False` turns off R2Gen's
    random crop and horizontal flip (the flip puts a left-sided finding on the right while its report still says
    left). `keep="best"` writes the epoch with the best validation BLEU-4 (the reference's selection); `keep="last"`
    the last validated epoch, for a caller that judges the model on other grounds than BLEU (site fine-tuning: the
    BLEU-best epoch may name no finding, and its validation studies are the ones the caller's gate judges on).
    """
    if keep not in ("best", "last"):
        raise RihaModelError(f"keep={keep!r}: use 'best' (validation BLEU-4) or 'last'.")
    if resume is not None and init is not None:
        raise RihaModelError("Pass either --resume (continue a run) or --init (fine-tune a model), not both.")
    if validate_every < 1:
        raise RihaModelError("validate_every must be at least 1 epoch.")
    processes = start_processes()
    device_ = resolve_device(device, processes)
    torch.manual_seed(seed)

    state = _load_state(Path(resume)) if resume is not None else None
    parent = load_checkpoint(init) if init is not None else None
    if state is not None:
        config, tokenizer = RihaConfig.from_dict(state["config"]), Tokenizer.from_dict(state["tokenizer"])
    elif parent is not None:
        config, tokenizer = parent.config, Tokenizer.from_dict(parent.tokenizer)
    else:
        config, tokenizer = None, None
    study_set = read_studies(data, images, dataset=tokenizer.dataset if tokenizer else dataset)
    if config is None:
        config = RihaConfig.preset(preset, **{"max_seq_len": TEXT_SETTINGS[study_set.dataset].max_seq_len,
                                              **(config_overrides or {})})
        tokenizer = build_tokenizer(study_set)
    recipe = RECIPES[study_set.dataset]
    lr = lr or LR_HEAD
    settings = dict(epochs=epochs or recipe.epochs, batch_size=batch_size or recipe.batch_size, lr=lr,
                    lr_backbone=lr_backbone or lr * (LR_BACKBONE / LR_HEAD), lr_step=lr_step or recipe.lr_step,
                    lr_gamma=lr_gamma or recipe.lr_gamma, augment=augment, keep=keep)
    if state is not None:  # a resumed run keeps its seed and schedule; only the number of epochs may grow
        settings = {**state["settings"], "epochs": epochs or state["settings"]["epochs"]}
        seed = state["seed"]

    train_studies, val_studies = study_set.split("train"), study_set.split(val_split)
    if parent is not None:
        model = parent.model.to(device_).train()
    else:
        model = RIHA(config, tokenizer.vocab_size, pretrained=state is None).to(device_)
    optimizer = torch.optim.Adam(
        [{"params": list(model.backbone_parameters()), "lr": settings["lr_backbone"]},
         {"params": list(model.head_parameters()), "lr": settings["lr"]}],
        weight_decay=WEIGHT_DECAY, amsgrad=True)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, settings["lr_step"], settings["lr_gamma"])

    run = _Run(model=model, optimizer=optimizer, scheduler=scheduler, config=config, tokenizer=tokenizer,
               device=device_, processes=processes, out=Path(out), settings=settings, seed=seed,
               metadata=_metadata(study_set, data, preset, seed, settings, parent, state))
    if state is not None:
        run.restore(state)
        if processes.is_main and Path(out).resolve() != Path(resume).resolve() and Path(resume).is_file():
            shutil.copyfile(resume, out)  # the best model so far travels with the run
    train_dataset = ReportDataset(train_studies, tokenizer, config, augment=settings["augment"])
    loader = _train_loader(train_dataset, tokenizer, config, settings["batch_size"], seed, processes, device_,
                           num_workers)
    val_dataset = ReportDataset(val_studies, tokenizer, config)
    try:
        return run.fit(loader, val_dataset, validate_every)
    finally:
        if processes.distributed:
            torch_dist.barrier()


def _metadata(study_set: StudySet, data, preset: str, seed: int, settings: dict, parent: Checkpoint | None,
              state: dict | None) -> dict:
    if state is not None:
        return state["metadata"]
    return {"dataset": study_set.dataset, "data": Path(data).name, "data_counts": study_set.counts(),
            "preset": preset if parent is None else parent.metadata.get("preset"), "seed": seed,
            "recipe": settings, "parent_sha256": parent.sha256 if parent is not None else None,
            "torch": str(torch.__version__)}


def _train_loader(dataset: ReportDataset, tokenizer: Tokenizer, config: RihaConfig, batch_size: int, seed: int,
                  processes: Processes, device: torch.device, num_workers: int | None) -> DataLoader:
    """Shuffled by a DistributedSampler in every case: the order is a function of (seed, epoch) alone, so a run
    and its resumption see the same batches."""
    sampler = DistributedSampler(dataset, num_replicas=processes.world_size, rank=processes.rank, shuffle=True,
                                 seed=seed)
    if num_workers is None:
        num_workers = min(4, max(0, (os.cpu_count() or 1) - 1)) if device.type == "cuda" else 0
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=Collate(tokenizer, config), pin_memory=device.type == "cuda",
                      persistent_workers=num_workers > 0)


@dataclass
class _Run:
    """One training run's moving parts, its best score so far and its history."""

    model: RIHA
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.StepLR
    config: RihaConfig
    tokenizer: Tokenizer
    device: torch.device
    processes: Processes
    out: Path
    settings: dict
    seed: int
    metadata: dict
    start_epoch: int = 1
    best_score: float = -math.inf
    best_epoch: int = 0
    best_metrics: dict = field(default_factory=dict)
    sha256: str = ""
    history: list[dict] = field(default_factory=list)

    def fit(self, loader: DataLoader, val_dataset: ReportDataset, validate_every: int) -> TrainResult:
        network = self.model
        if self.processes.distributed:
            network = DistributedDataParallel(self.model, device_ids=[self.device.index]
                                              if self.device.type == "cuda" else None)
        epochs = self.settings["epochs"]
        if self.start_epoch > epochs:
            raise RihaModelError(f"No epoch is left to train: the run in {self.out} has reached epoch "
                                 f"{self.start_epoch - 1} of {epochs}; pass more --epochs to continue it.")
        for epoch in range(self.start_epoch, epochs + 1):
            started = time.monotonic()
            loader.sampler.set_epoch(epoch)
            record = {"epoch": epoch, **self._train_epoch(network, loader, epoch, epochs)}
            self.scheduler.step()
            validated = epoch % validate_every == 0 or epoch == epochs
            if validated:
                record.update(self._validate(val_dataset, epoch))
            record["seconds"] = round(time.monotonic() - started, 2)
            self.history.append(record)
            if self.processes.is_main:
                if validated:
                    self._save_state(epoch)
                scores = (f" val {SELECTION_METRIC} {record['val_' + SELECTION_METRIC]:.4f} clinical micro F1 "
                          f"{record['val_clinical_efficacy']['micro_f1']:.4f}") if validated else ""
                log.info("epoch %d/%d loss %.4f lm %.4f cha %.4f%s (%.1f s)", epoch, epochs, record["loss"],
                         record["lm_loss"], record["cha_loss"], scores, record["seconds"])
        return TrainResult(checkpoint=self.out, sha256=self.sha256, best_epoch=self.best_epoch,
                           best_metrics=self.best_metrics, history=self.history)

    def _train_epoch(self, network, loader: DataLoader, epoch: int, epochs: int) -> dict:
        self.model.train()
        totals = {"loss": 0.0, "lm_loss": 0.0, "cha_loss": 0.0}
        steps = 0
        bar = tqdm(loader, desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False, disable=not show_progress())
        for batch in bar:
            batch = batch.to(self.device)
            with autocast(self.device):
                losses = network(batch)
            self.optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_value_(self.model.parameters(), GRAD_CLIP_VALUE)
            self.optimizer.step()
            for key in totals:
                totals[key] += float(losses[key].detach())
            steps += 1
            bar.set_postfix(loss=f"{totals['loss'] / steps:.3f}")
        if not math.isfinite(totals["loss"]):
            raise RihaModelError(f"Training diverged at epoch {epoch} (loss {totals['loss']}); lower the learning "
                                 "rate or check the data.")
        return {key: value / max(steps, 1) for key, value in totals.items()}

    def _validate(self, val_dataset: ReportDataset, epoch: int) -> dict:
        """Generation on every process's share of validation; rank 0 scores, keeps the best checkpoint and tells the
        rest."""
        references, hypotheses = generate_texts(self.model, self.tokenizer, val_dataset, self.settings["batch_size"],
                                                self.device, self.processes, desc="validate")
        metrics = validation_scores(references, hypotheses) if self.processes.is_main else {}
        if self.processes.is_main and (self.settings.get("keep") == "last" or
                                       metrics[SELECTION_METRIC] > self.best_score):
            self.best_score, self.best_epoch, self.best_metrics = metrics[SELECTION_METRIC], epoch, metrics
            self.sha256 = save_checkpoint(self.out, self.model, self.config, self.tokenizer.to_dict(),
                                          metadata={**self.metadata, "epochs": epoch}, metrics={"val": metrics})
        if self.processes.distributed:
            shared = [(self.best_score, self.best_epoch, self.best_metrics, self.sha256, metrics)]
            torch_dist.broadcast_object_list(shared, src=0)
            self.best_score, self.best_epoch, self.best_metrics, self.sha256, metrics = shared[0]
        return {f"val_{key}": value for key, value in metrics.items()}

    # ------------------------------------------------------------------------------------------- resume

    def _save_state(self, epoch: int) -> None:
        state = {
            "format": STATE_FORMAT, "epoch": epoch, "settings": self.settings, "seed": self.seed,
            "config": self.config.to_dict(), "tokenizer": self.tokenizer.to_dict(), "metadata": self.metadata,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "best_score": self.best_score, "best_epoch": self.best_epoch,
            "best_metrics": self.best_metrics, "sha256": self.sha256, "history": self.history,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        path = state_path(self.out)
        temporary = path.with_name(path.name + ".partial")
        torch.save(state, temporary)
        os.replace(temporary, path)

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch = state["epoch"] + 1
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        self.best_metrics, self.sha256, self.history = state["best_metrics"], state["sha256"], list(state["history"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])


def state_path(checkpoint: str | os.PathLike) -> Path:
    """The training state file kept beside a checkpoint for --resume."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + STATE_SUFFIX)


def _load_state(checkpoint: Path) -> dict:
    path = state_path(checkpoint)
    if not path.is_file():
        raise RihaModelError(f"No training state {path} beside {checkpoint}; only a run of `riha-node train` can be "
                             "resumed (to fine-tune a finished model, use --init).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a damaged file
        raise RihaModelError(f"Training state {path} cannot be read ({exc}); start again or fine-tune with --init.") \
            from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise RihaModelError(f"Training state {path} is not in the format this riha_model writes; start again.")
    return state
