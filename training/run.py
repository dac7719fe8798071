"""A whole training run: check inputs -> prepare the dataset -> train (in process, or one process per GPU under
torchrun) -> `trained_model.tar`.

`run_training` is what `train.py` (Cog and CLI) calls. `run_worker` is one training process: load the base model,
encode the clips once, train, and (rank 0) export. `python -m training.worker --params_json ...` is the torchrun
entry of each worker (`worker_main` here, after training/worker.py took the secrets out of its environment).

Output folder layout: `trained_model.tar`, `checkpoints/checkpoint-<step>.pt`, `cache/` (codes, chroma),
`work/dataset/` (the prepared clips), `train_params.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import shutil
import sys
import typing as tp
from pathlib import Path

import torch

from core import versions
from core.catalogue import SPEC
from core.devices import default_device
from core.errors import USER_ERRORS, ModelUnavailableError
from core.hub import TEXT_ENCODER, hub_unreachable
from core.params import InputError, from_kwargs
from generation.request import check_sampler_precision
from preprocessing import PrepareParams, load_prepared, prepare, vocals
from preprocessing.fingerprint import Fingerprints, fingerprint, prepared_folder
from preprocessing.params import is_url
from training import checkpoint as ckpt
from training import dist as dist_mod
from training import evaluate as evaluation
from training import publish
from training.data import ClipTokens, TokenDataset, encode_clips
from training.dist import DistInfo
from training.export import TAR_NAME, check_output_dir, export_trained_model
from training.families import load_base, prepare_conditions
from training.loop import RunPlan, TrainingInterrupted, check_resume_compatible, plan_run, resolve_precision, train_loop
from training.methods import Prepared, enable_gradient_checkpointing, get_method, prior
from training.methods import check_inputs as check_method_inputs
from training.params import TrainParams, dropped_settings, prepare_kwargs, validate

logger = logging.getLogger(__name__)

__all__ = [
    "run_training",
    "run_worker",
    "setup_training",
    "Setup",
    "prepare_dataset",
    "check_inputs",
    "Checked",
    "InputProblems",
    "data_identity",
    "TAR_NAME",
]

PARAMS_FILE = "train_params.json"
WORK_FOLDERS = ("work", evaluation.VALIDATION_WORK)  # what preparation makes in output_dir


class InputProblems(InputError):
    """Several problems with the inputs, found before any work: all of them, each on its own line."""

    def __init__(self, errors: list[Exception]):
        lines = "\n".join(f"  - {e}" for e in errors)
        names = list(dict.fromkeys(f"'{e.name}'" if isinstance(e, InputError) else type(e).__name__ for e in errors))
        message = f"{len(errors)} problems ({', '.join(names)}); nothing was started. Fix all of them:\n{lines}"
        ValueError.__init__(self, message)
        self.name = ", ".join(n.strip("'") for n in names)
        self.errors = errors


class _Problems:
    """Collects the user errors of the checks that run before any work, so one refusal names them all."""

    def __init__(self) -> None:
        self.errors: list[Exception] = []

    @contextlib.contextmanager
    def check(self) -> tp.Iterator[None]:
        try:
            yield
        except USER_ERRORS as e:
            self.errors.extend(e.errors if isinstance(e, InputProblems) else [e])

    def raise_any(self) -> None:
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            raise InputProblems(self.errors)


@dataclasses.dataclass
class Checked:
    """What the checks found that the run uses: the resume checkpoint's step, and the data's fingerprints."""

    resume_step: int | None = None
    dataset: Fingerprints | None = None
    validation: Fingerprints | None = None
    identity: dict | None = None  # data_identity(): recorded in every checkpoint (training/checkpoint.py)


def check_inputs(params: TrainParams) -> Checked:
    """Every check on the inputs that needs no model, before any long work (nothing is prepared or loaded); all the
    problems found are raised together (`InputProblems`), or the one alone."""
    problems = _Problems()
    checked = Checked()
    with problems.check():
        validate(params)
    for dropped in dropped_settings(params):
        logger.warning(dropped)
    with problems.check():
        check_method_inputs(params)  # from scratch, the method's own, prior preservation (training/methods/)
    with problems.check():
        evaluation.check(params)  # validation_split / validation_path and friends (training/evaluate.py)
    device = default_device()
    with problems.check():
        resolve_precision(params.precision, device)
    with problems.check():
        check_sampler_precision(params.sampler_precision, device)  # int8 samples need the CPU
    with problems.check():
        publish.check_inputs(params)  # wandb key, hf_repo_id + hf_token
    with problems.check():
        _check_model_available(params)  # the base model and its text encoder: cached, or fetchable now
    with problems.check():
        _check_demucs_available(params)
    byte_cap = int(PrepareParams(**prepare_kwargs(params)).max_unpacked_gb * 2**30)
    if _given(params.dataset_path) and not is_url(str(params.dataset_path)):
        with problems.check():
            checked.dataset = fingerprint(str(params.dataset_path), "dataset_path", byte_cap)
    with problems.check():  # before the training set is prepared: validating on it, or on nothing, is refused
        checked.validation = evaluation.check_validation_data(params, checked.dataset, byte_cap)
    if checked.dataset is not None:
        checked.identity = data_identity(params, checked.dataset, checked.validation)
    if params.resume_from:
        with problems.check():
            path = ckpt.find_checkpoint(params.resume_from)
            state = ckpt.load_checkpoint(path, mmap=True)  # the checksum is verified here, before any work
            ckpt.check_complete(path, state)
            check_resume_compatible(state, params)
            if checked.identity is not None:
                ckpt.check_resume_data(state, checked.identity, str(path))
            checked.resume_step = int(state["step"])
            del state
    problems.raise_any()
    return checked


def _given(value: tp.Any) -> bool:
    return value is not None and bool(str(value).strip())


def data_identity(params: TrainParams, dataset: Fingerprints, validation: Fingerprints | None) -> dict:
    """The training and validation data by content, as a checkpoint records it (`checkpoint.check_resume_data`)."""
    kind = "path" if validation is not None else "split" if params.validation_split > 0 else "off"
    return {
        "dataset": {"sha256": dataset.digest, "tracks": len(dataset.tracks)},
        "validation": {
            "kind": kind,
            "sha256": validation.digest if validation is not None else None,
            "tracks": len(validation.tracks) if validation is not None else None,
        },
    }


def _check_model_available(params: TrainParams) -> None:
    """The base model and what loading it reads (its text encoder) in the Hugging Face cache, or a hub that answers
    one request now: `core.versions.check_available`, as predict uses it. Tiny, scratch and folder models need
    nothing from the hub here."""
    spec = SPEC.get(params.model_version)
    if spec is None or not spec.hub_id:  # a folder, or a model built here (tiny, from scratch)
        return
    problems = versions.check_available(params.model_version)
    if problems:
        raise ModelUnavailableError(" ".join(problems))


def _check_demucs_available(params: TrainParams) -> None:
    """demucs' htdemucs weights, for drop_vocals and for a melody model's chroma (audiocraft loads it by name):
    read from the disk only (the tiny melody model brings its own)."""
    spec = SPEC.get(params.model_version)
    melody = spec is not None and spec.melody and spec.loader == "audiocraft"  # a tiny melody brings its own
    uploads = [p for p in (params.dataset_path, params.validation_path) if _given(p)]
    # a prepared folder is read as it is: its vocals were removed (or not) when it was prepared
    to_prepare = [p for p in uploads if prepared_folder(Path(str(p)).expanduser()) is None]
    if not ((params.drop_vocals and to_prepare) or melody):
        return
    missing = vocals.missing_weights(None)
    vocal_removal = params.drop_vocals and bool(to_prepare)
    # For the chroma alone, audiocraft downloads it when the network answers.
    if missing is None or (not vocal_removal and hub_unreachable(TEXT_ENCODER, "config.json") is None):
        return
    if not vocal_removal:
        missing = missing.replace("Vocal removal (drop_vocals)", f"The melody model {params.model_version}", 1)
        missing = missing.replace(", or set drop_vocals to false", "")
    raise ModelUnavailableError(missing)


def prepare_dataset(params: TrainParams, work_dir: Path) -> tp.Any:
    """The clips to train on: an already prepared folder as is, anything else through `preprocessing.prepare`."""
    source = Path(str(params.dataset_path)).expanduser()
    if source.is_dir() and (source / "data.jsonl").is_file():
        dataset = load_prepared(source)
    elif source.is_dir() and (source / "dataset" / "data.jsonl").is_file():
        dataset = load_prepared(source / "dataset")
    else:
        dataset = prepare(PrepareParams(**prepare_kwargs(params)), work_dir)
    if not dataset.clips:
        raise InputError("dataset_path", f"no usable clips in {params.dataset_path} (report: {dataset.report})")
    return dataset


def run_training(params: TrainParams, output_dir: Path, nproc: int | None = None) -> Path:
    """Train and return the path of `output_dir/trained_model.tar`.

    `nproc`: training processes; default one per visible GPU. More than one runs under torchrun (DDP or FSDP, see
    the `parallel` input); this process then only prepares the dataset and waits.
    """
    made = _Made(Path(output_dir).expanduser())
    problems, checked = _Problems(), Checked()
    with problems.check():
        checked = check_inputs(params)
    with problems.check():
        output_dir = check_output_dir(output_dir)  # a file or a read-only folder: refused with the rest
    with made.removed_on_refusal():
        problems.raise_any()
    with made.removed_on_refusal():
        # validation_path first: a validation set that yields no clip is refused before the (longer) training set
        validation = evaluation.prepare_validation(params, output_dir)
        dataset = prepare_dataset(params, output_dir / "work")
    nproc = dist_mod.visible_gpus() if nproc is None else nproc
    if nproc > 1 and not DistInfo.under_torchrun():
        params_file = output_dir / PARAMS_FILE
        # Secrets go to the workers through their environment, never into this file (training/publish.py).
        params_file.write_text(json.dumps(publish.public_inputs(params), indent=1))
        try:
            dist_mod.launch_torchrun(
                nproc,
                "training.worker",
                ["--params_json", str(params_file), "--dataset", str(dataset.folder), "--output_dir", str(output_dir)]
                + (["--validation_dataset", str(validation.folder)] if validation is not None else [])
                + (["--data_identity", json.dumps(checked.identity)] if checked.identity is not None else [])
                + (["--checkpoint_verified"] if params.resume_from else [])
                # This process reports an interruption (below): the workers, stopped within seconds, must not.
                + ["--parent_reports_interruption"],
                env=publish.worker_env(params),
            )
        except BaseException as e:
            # Cancelled: the workers saved a resume checkpoint and exited; push it from here, where there is time
            # (torchrun gives a worker only seconds after its SIGTERM).
            if not isinstance(e, Exception):
                publish.report_interrupted(params, output_dir / "checkpoints")
            raise
    else:
        run_worker(
            params, dataset, output_dir, validation=validation, data_identity=checked.identity, checkpoint_verified=True
        )
    tar = output_dir / TAR_NAME
    if not tar.is_file():
        raise RuntimeError(f"training finished without writing {tar}")
    return tar


class _Made:
    """The folders a run makes before training (output_dir itself, its work folders) that did not exist before it:
    a run refused while preparing removes them again, and nothing else (it never deletes what it did not make)."""

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.new = [f for f in (output_dir, *(output_dir / n for n in WORK_FOLDERS)) if not f.exists()]

    @contextlib.contextmanager
    def removed_on_refusal(self) -> tp.Iterator[None]:
        try:
            yield
        except USER_ERRORS:
            for folder in self.new[::-1]:
                if folder == self.output_dir:
                    with contextlib.suppress(OSError):
                        folder.rmdir()  # only when empty: what the run made inside it went first
                else:
                    shutil.rmtree(folder, ignore_errors=True)
            raise


def _wandb_logger(params: TrainParams, dist: DistInfo, output_dir: Path) -> publish.WandbRun | None:
    """Rank 0's wandb run, or None (off, or failed to start: logged, the training goes on)."""
    if not dist.is_main:
        return None
    return publish.start_wandb(params, output_dir)


@dataclasses.dataclass
class Setup:
    """Everything a training process builds before its loop: the model, the tokens, the plan of the run."""

    model: tp.Any  # audiocraft MusicGen; `model.lm` trains
    clips: list[ClipTokens]
    tokens: TokenDataset
    plan: RunPlan
    prepared: Prepared  # the method's trainable set and export keys (training/methods/base.py)
    evaluator: evaluation.Evaluator | None = None  # validation on held-out tracks (None: off)
    reference: dict | None = None  # rank 0: the base model's samples of held-out prompts (evaluate.audio_check)


def setup_training(
    params: TrainParams, dataset: tp.Any, output_dir: Path, dist: DistInfo, validation: tp.Any = None
) -> Setup:
    """Load the base model (compression model frozen), encode the clips once, melody chroma once, plan the run.

    `validation`: validation_path's prepared dataset, else a share of `dataset`'s tracks is held out
    (training/evaluate.py); the held-out clips are encoded like the others and only evaluated."""
    model = load_base(params, dist.device)  # by its family (training/families.py): scratch builds a new LM
    compression, lm = model.compression_model, model.lm
    compression.eval()
    for p in compression.parameters():  # frozen: only the LM trains
        p.requires_grad_(False)
    cache_dir = output_dir / "cache"
    split = evaluation.select_validation(params, dataset.clips, validation)  # whole tracks held out, or validation_path
    examples = list(split.train)
    if params.prior_preservation:  # generated by the base model, before anything trains (training/methods/prior.py)
        seconds = min(params.segment_duration, max(c.duration for c in split.train))
        examples += prior.generate_prior_clips(model, split.train, params, cache_dir / "prior", dist, seconds)
    reference = None  # before training, and before melody/style set-up switch the conditioners to training
    if split.validation and params.sample_duration > 0 and dist.is_main:
        reference = evaluation.base_reference(model, split.validation, params)
    general, general_info = [], None  # forgetting: general music the base model generated (training/evaluate.py)
    if split.validation and evaluation.forgetting_wanted(params, dist.device, examples):
        general, general_info = evaluation.general_music(model, params, examples, cache_dir / "forgetting", dist)
    clips = encode_clips(compression, examples, cache_dir / "codes", dist, dist.device)
    held_out = []  # validation clips: encoded like the others, only evaluated
    if split.validation:
        held_out = encode_clips(compression, split.validation, cache_dir / "codes", dist, dist.device)
    # the base's own prompts, not adjusted by the method (no trigger): general music as the base model knows it
    general = encode_clips(compression, general, cache_dir / "codes", dist, dist.device) if general else []
    # melody chroma once per clip, style conditioners frozen: each family's set-up of its conditioners on this lm
    conditions = prepare_conditions(
        lm, clips + held_out + general, cache_dir, dist, model_key=params.model_version, seed=params.seed + dist.rank
    )
    method = get_method(params.method)  # what trains and on which examples (training/methods/)
    with torch.random.fork_rng(devices=[]):  # what a method initialises (LoRA factors) depends on the seed only
        torch.manual_seed(params.seed)
        prepared = method.prepare(lm, params)  # what trains and what the tar carries
    clips = method.adjust_clips(clips, prepared, params)
    held_out = method.adjust_clips(held_out, prepared, params) if held_out else []  # e.g. the trigger's tokens
    if params.gradient_checkpointing:
        enable_gradient_checkpointing(lm)
    plan = plan_run(
        params,
        n_clips=len(clips),
        longest_clip_frames=max(c.n_frames for c in clips),
        frame_rate=compression.frame_rate,
        world_size=dist.world_size,
        device=dist.device,
    )

    def token_dataset(examples: list[ClipTokens]) -> TokenDataset:
        """Training and held-out examples alike: the same crop length, padding and conditions."""
        return TokenDataset(
            examples,
            segment_frames=plan.segment_frames,
            special_token_id=lm.special_token_id,
            frame_rate=compression.frame_rate,
            sample_rate=compression.sample_rate,
            text_conditions=lm.condition_provider.text_conditions,
            wav_conditions=list(conditions),
        )

    tokens = token_dataset(clips)
    evaluator = None
    samples = None  # samples during training (rank 0): the report's timeline and wandb
    if held_out and params.sample_duration > 0 and dist.is_main:  # melody and style: their held-out clip's audio too
        samples = evaluation.training_samples(model, split.validation, params)
    if held_out:
        evaluator = evaluation.Evaluator(
            token_dataset(held_out),
            split.info,
            every=params.eval_every or plan.steps_per_epoch,
            keep_best=params.keep_best,
            patience=params.early_stop_patience,
            forgetting=token_dataset(general) if general else None,
            forgetting_info=general_info,
            samples=samples,
        )
    elif dist.is_main and (params.validation_split > 0 or params.validation_path):  # else said before any work
        for dropped in evaluation.dropped_without_validation(params):
            logger.warning("%s is ignored: there is no validation set", dropped)
    if dist.is_main:
        logger.info(
            "Training %s (%s) on %d clips: %d steps (%d epochs x %d), batch %d over %d process(es), %.1f s crops, %s",
            params.model_version,
            params.method,
            len(clips),
            plan.total_steps,
            params.epochs,
            plan.steps_per_epoch,
            plan.global_batch,
            dist.world_size,
            plan.segment_frames / compression.frame_rate,
            resolve_precision(params.precision, dist.device)[2],
        )
    return Setup(model, clips, tokens, plan, prepared, evaluator, reference)


def run_worker(
    params: TrainParams,
    dataset: tp.Any,
    output_dir: Path,
    dist: DistInfo | None = None,
    validation: tp.Any = None,
    data_identity: dict | None = None,
    checkpoint_verified: bool = False,
    report_interruption: bool = True,
) -> Path | None:
    """One training process: set up, train, and (rank 0) export. Returns the tar path on rank 0, else None.
    `validation`: validation_path's prepared dataset (None: a share of `dataset`'s tracks, or no validation).
    `data_identity`: the data's fingerprints, recorded in the checkpoints. `checkpoint_verified`: `check_inputs`
    already verified resume_from's checksum (it is not read twice for it). `report_interruption`: rank 0 pushes (or
    names) the resume checkpoint of an interrupted run; False in torchrun workers, whose launching process does it."""
    own_group = dist is None
    dist = dist or dist_mod.init()
    # The loop, its checkpoints and the export get the inputs without the secrets: nothing they write can hold one.
    # Only wandb and the Hugging Face push (training/publish.py) see `params` itself.
    secrets, params = params, publish.without_secrets(params)
    run = None
    try:
        if not dist.is_main:
            logging.getLogger().setLevel(logging.WARNING)
        setup = setup_training(params, dataset, output_dir, dist, validation)
        lm = setup.model.lm
        resume_state = None
        if params.resume_from:
            resume_state = ckpt.load_checkpoint(
                ckpt.find_checkpoint(params.resume_from), verify=not checkpoint_verified
            )
        run = _wandb_logger(secrets, dist, output_dir)
        if run is not None and setup.evaluator is not None and setup.evaluator.samples is not None:
            setup.evaluator.samples.on_samples = run.log_audio  # each evaluation's samples, heard on wandb
        try:
            result = train_loop(
                lm,
                setup.tokens,
                params,
                setup.plan,
                dist,
                output_dir / "checkpoints",
                resume_state=resume_state,
                on_metrics=run.log if run is not None else None,
                evaluator=setup.evaluator,
                data_identity=data_identity,
            )
        except BaseException as e:
            # SIGTERM (TrainingInterrupted) or a cancel (Cog, Ctrl-C: not an Exception) left a resume checkpoint in
            # a folder that dies with the container: push it to hf_repo_id, or say so (training/publish.py).
            interrupted = isinstance(e, TrainingInterrupted) or not isinstance(e, Exception)
            if dist.is_main and interrupted and report_interruption:
                publish.report_interrupted(secrets, output_dir / "checkpoints")
            raise
        del resume_state
        if result.lm is not None:  # FSDP: the trained LM is sharded; rank 0 exports from its whole copy
            setup.model.lm = result.lm
        if dist.distributed:
            difference = dist_mod.rank_weight_difference(dist, lm.state_dict().values())  # FSDP: gathered
            if dist.is_main:
                if difference == 0.0:
                    logger.info("All %d ranks hold identical weights", dist.world_size)
                else:
                    logger.warning("Ranks ended with different weights (checksum difference %.3e)", difference)
        tar = None
        if dist.is_main:
            tar = export_trained_model(
                output_dir / TAR_NAME,
                model=setup.model,
                prepared=setup.prepared,
                result=result,
                params=params,
                clips=setup.clips,
                audio_reference=setup.reference,
                dataset_report=getattr(dataset, "report", None),
                run_info={
                    "world_size": dist.world_size,
                    "global_batch": setup.plan.global_batch,
                    "parallel": result.parallel,
                },
                checkpoint_dir=output_dir / "checkpoints",  # a failed export keeps the trained state there
                timeline=setup.evaluator.samples.audio if setup.evaluator and setup.evaluator.samples else None,
            )
            if run is not None:
                run.log_samples(tar)
                run.finish()
                run = None
            publish.push_trained_model(secrets, tar)  # hf_repo_id: a failure is logged, the tar is still returned
        dist_mod.barrier(dist)
        return tar
    finally:
        if run is not None:  # the training failed or was stopped: close the wandb run as failed
            run.finish(exit_code=1)
        if own_group:
            dist_mod.shutdown(dist)


def worker_main(argv: list[str] | None, secrets: dict[str, str]) -> int:
    """One worker of a multi-process run started by `run_training` (or by hand, multi-node), through
    `python -m training.worker`, which passes the `secrets` it took out of the environment."""
    parser = argparse.ArgumentParser(description="One training process (started by torchrun).")
    parser.add_argument("--params_json", required=True, help="training inputs as JSON (written by run_training)")
    parser.add_argument("--dataset", required=True, help="a prepared dataset folder (holding data.jsonl)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--validation_dataset", default=None, help="validation_path, prepared by run_training")
    parser.add_argument("--data_identity", default=None, help="the data's fingerprints as JSON (run_training)")
    parser.add_argument(
        "--checkpoint_verified", action="store_true", help="run_training verified resume_from's checksum"
    )
    parser.add_argument(
        "--parent_reports_interruption",
        action="store_true",
        help="the launching process (run_training) pushes the checkpoint of an interrupted run, not this worker",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The params file has no secrets: run_training passed them in the environment, training.worker took them out.
    params = from_kwargs(
        TrainParams, **json.loads(Path(args.params_json).read_text()), **publish.worker_secrets(secrets)
    )
    validation = load_prepared(args.validation_dataset) if args.validation_dataset else None
    run_worker(
        params,
        load_prepared(args.dataset),
        Path(args.output_dir),
        validation=validation,
        data_identity=json.loads(args.data_identity) if args.data_identity else None,
        checkpoint_verified=args.checkpoint_verified,
        report_interruption=not args.parent_reports_interruption,
    )
    return 0


if __name__ == "__main__":
    sys.exit(
        "The torchrun entry of a training worker is `python -m training.worker` (same flags); see docs/training.md."
    )
