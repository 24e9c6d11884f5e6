"""The ``kidneyreg`` command line (see DESIGN.md section 3).

Every command validates its input and reports a problem as one line naming the file
(:class:`kidneyreg.errors.InputError`), exiting with status 2 and without a traceback.
Heavy modules are imported inside the commands so that ``kidneyreg --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from kidneyreg import __version__
from kidneyreg.errors import InputError

app = typer.Typer(
    name="kidneyreg",
    help="Deep 3D CT to 2D ultrasound kidney registration during free breathing.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"kidneyreg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    """Deep 3D CT to 2D ultrasound kidney registration during free breathing."""


@app.command()
def simulate(
    out: Annotated[
        Path, typer.Option("--out", help="Cohort folder (case_000, case_001... inside).")
    ],
    cases: Annotated[int, typer.Option("--cases", help="Number of cases.")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Cohort seed (same seed, same cases).")] = 0,
    frames: Annotated[
        int | None,
        typer.Option("--frames", help="Frames per case (default: two breathing cycles)."),
    ] = None,
    group: Annotated[str, typer.Option("--group", help="Pose-offset group: A, B or mixed.")] = (
        "mixed"
    ),
    profile: Annotated[
        str, typer.Option("--profile", help="Resolution profile: paper, cpu or tiny.")
    ] = "cpu",
    phase: Annotated[
        str,
        typer.Option("--phase", help="CT phase: corticomedullary, nephrographic or plain."),
    ] = "corticomedullary",
    from_ct: Annotated[
        Path | None,
        typer.Option(
            "--from-ct", help="Real CT (file or case folder) instead of a procedural one."
        ),
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            help="Kidney label map of --from-ct on its grid: 1 right / 2 left, a 0/1 mask of "
            "one or both kidneys (sides by position), KiTS, or TotalSegmentator v1.",
        ),
    ] = None,
    kidney: Annotated[
        str | None,
        typer.Option(
            "--kidney", help="Kidney to scan: right or left (default right; mixed: by seed)."
        ),
    ] = None,
    approach: Annotated[
        str,
        typer.Option(
            "--approach",
            help="Probe approach: sagittal (anterior, the default pose) or flank "
            "(posterolateral, coronal-oblique view); init.json holds its nominal pose.",
        ),
    ] = "sagittal",
    preview: Annotated[
        bool, typer.Option("--preview/--no-preview", help="Draw preview.png in each case.")
    ] = True,
) -> None:
    """Simulate a cohort of synthetic patients with exact ground truth (DESIGN.md case folders)."""
    from tqdm import tqdm

    from kidneyreg.simulate.case import check_options, simulate_cohort

    if cases < 1:
        raise InputError("--cases", f"must be at least 1, got {cases}")
    check_options(
        frames=frames,
        group=group,
        profile=profile,
        phase=phase,
        from_ct=from_ct,
        labels=labels,
        kidney=kidney,
        approach=approach,
    )
    with _one_line_warnings(), tqdm(total=cases, desc="simulate", unit="case") as bar:
        folders = simulate_cohort(
            out,
            cases,
            seed,
            frames=frames,
            group=group,
            profile=profile,
            phase=phase,
            from_ct=from_ct,
            labels=labels,
            kidney=kidney,
            approach=approach,
            preview=preview,
            progress=lambda _i, _folder: bar.update(1),
        )
    typer.echo(f"wrote {len(folders)} case(s) to {out}")


@app.command()
def evaluate(
    case: Annotated[
        Path, typer.Option("--case", help="Case folder (us_kidney_mask, ct_kidney_mask...).")
    ],
    pred: Annotated[
        Path, typer.Option("--pred", help="Predicted poses (transforms.json), one per frame.")
    ],
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the summary and frames as JSON.")
    ] = None,
) -> None:
    """HD / MCD (CT-US, CT-CT), TRE and angle errors of predicted poses on one case."""
    from kidneyreg.evaluation.evaluate import evaluate_case

    result = evaluate_case(case, pred)
    typer.echo(f"{case}: {result.n_frames} frame(s), prediction {pred}")
    typer.echo(result.format_table())
    if json_out is not None:
        result.write_json(json_out)
        typer.echo(f"wrote {json_out}")


@app.command("train-features")
def train_features(
    modality: Annotated[str, typer.Option("--modality", help="Network to train: ct or us.")],
    data: Annotated[
        Path,
        typer.Option("--data", help="Simulated cohort (case folders) or KiTS19 folder (CT)."),
    ],
    out: Annotated[
        Path,
        typer.Option("--out", help="Checkpoint (.pt); .best.pt and .log.csv are written beside."),
    ],
    profile: Annotated[
        str, typer.Option("--profile", help="Resolution profile: paper, cpu or tiny.")
    ] = "cpu",
    epochs: Annotated[
        int | None, typer.Option("--epochs", help="Total epochs (default: the profile's).")
    ] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help="Steps per epoch (default: the profile's).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Patches per step (default: the profile's).")
    ] = None,
    window: Annotated[
        int | None, typer.Option("--window", help="U/S frames per window (default: 5).")
    ] = None,
    lr: Annotated[
        float | None, typer.Option("--lr", help="Adam learning rate (default: 1e-4, the paper's).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run saved in --out.")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of split, patches and dropout.")] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or auto.")] = "cpu",
    export: Annotated[
        Path | None,
        typer.Option("--export", help="Also write a compact float16 copy of the best model."),
    ] = None,
    from_checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="Start from this feature model's weights (fine-tuning), not random ones.",
        ),
    ] = None,
    tissue_contrast: Annotated[
        bool,
        typer.Option(
            "--tissue-contrast",
            help="Also vary each simulated tissue's brightness at random: CT HU offsets (needs "
            "labels.nii.gz), U/S gains (needs us_labels.nii.gz).",
        ),
    ] = False,
    patch_scale: Annotated[
        float,
        typer.Option(
            "--patch-scale",
            help="Largest factor on the patch size per axis; each step draws its patch size "
            "between 1x and this (1: fixed patches, as the paper).",
        ),
    ] = 1.0,
    acoustic_bands: Annotated[
        bool,
        typer.Option(
            "--acoustic-bands",
            help="U/S only: also darken or brighten random bands along the beam (acoustic "
            "shadows, posterior enhancement).",
        ),
    ] = False,
    ce_weight: Annotated[
        float,
        typer.Option(
            "--ce-weight",
            help="Add this weight times binary cross-entropy to the paper's Dice loss (0: the "
            "paper's loss; Dice alone draws uncertain outlines too large).",
        ),
    ] = 0.0,
    structure: Annotated[
        str,
        typer.Option(
            "--structure",
            help="What to segment: kidney, or sinus (the renal sinus, from the simulator's label "
            "maps; for the plane search). --from may start a sinus run from a kidney model.",
        ),
    ] = "kidney",
) -> None:
    """Train the CT or U/S kidney (or renal-sinus) feature network (ULBNet) on case folders."""
    from kidneyreg.features.train import default_train_settings, export_model, train_from_folder

    if modality not in ("ct", "us"):
        raise InputError("--modality", f"must be ct or us, got {modality!r}")
    if profile not in ("paper", "cpu", "tiny"):
        raise InputError("--profile", f"must be paper, cpu or tiny, got {profile!r}")
    for name, value in (("--epochs", epochs), ("--steps", steps), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise InputError(name, f"must be at least 1, got {value}")
    if window is not None and (modality != "us" or window < 1):
        raise InputError("--window", "is a positive frame count, for --modality us only")
    if lr is not None and not 0 < lr < 1:
        raise InputError("--lr", f"must be a learning rate in (0, 1), got {lr}")
    if structure not in ("kidney", "sinus"):
        raise InputError("--structure", f"must be kidney or sinus, got {structure!r}")
    if acoustic_bands and modality != "us":
        raise InputError("--acoustic-bands", "is a U/S augmentation, for --modality us only")
    if not ce_weight >= 0:
        raise InputError("--ce-weight", f"must be >= 0, got {ce_weight}")
    from kidneyreg.features.ulbnet import MAX_INFERENCE_SCALE

    if not 1.0 <= patch_scale <= MAX_INFERENCE_SCALE:
        raise InputError(
            "--patch-scale", f"must be between 1 and {MAX_INFERENCE_SCALE:g}, got {patch_scale}"
        )
    settings = default_train_settings(
        profile,
        epochs=epochs,
        steps_per_epoch=steps,
        batch_size=batch_size,
        learning_rate=lr,
        seed=seed,
        tissue_contrast=tissue_contrast,
        patch_scale=patch_scale,
        acoustic_bands=acoustic_bands,
        cross_entropy_weight=ce_weight,
    )
    result = train_from_folder(
        modality,
        data,
        out,
        profile=profile,
        window=window,
        settings=settings,
        resume=resume,
        device=device,
        log=typer.echo,
        initial_weights=from_checkpoint,
        structure=structure,
    )
    typer.echo(f"wrote {result.checkpoint}, {result.best} and {result.log}")
    if export is not None:
        export_model(result.best, export)
        typer.echo(f"wrote {export}")


@app.command()
def segment(
    modality: Annotated[str, typer.Option("--modality", help="Input kind: ct or us.")],
    input_path: Annotated[
        Path,
        typer.Option("--input", help="CT volume, U/S sequence or a single U/S image (PNG)."),
    ],
    out: Annotated[
        Path,
        typer.Option("--out", help="Mask on the input's grid: .nii.gz/.nrrd/.mha, or .png."),
    ],
    spacing: Annotated[
        float | None,
        typer.Option("--spacing", help="U/S pixel size in mm (PNG or video input)."),
    ] = None,
    probabilities: Annotated[
        bool, typer.Option("--probabilities", help="Write probabilities instead of a mask.")
    ] = False,
    model: Annotated[
        Path | None, typer.Option("--model", help="Feature-net checkpoint (default: bundled).")
    ] = None,
    profile: Annotated[
        str, typer.Option("--profile", help="Profile of the bundled model.")
    ] = "cpu",
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or auto.")] = "cpu",
    view: Annotated[
        str,
        typer.Option(
            "--view",
            help="U/S view of the bundled model: sagittal, or flank (coronal-oblique from the "
            "flank).",
        ),
    ] = "sagittal",
) -> None:
    """Kidney mask (or probability map) of a CT or U/S input with the feature network."""
    from kidneyreg.features.infer import segment_file

    if spacing is not None and not spacing > 0:
        raise InputError("--spacing", f"must be a positive pixel size in mm, got {spacing}")
    result = segment_file(
        modality,
        input_path,
        out,
        spacing=spacing,
        probabilities=probabilities,
        model=model,
        profile=profile,
        device=device,
        view=view,
    )
    share = 100.0 * result.kidney_voxels / max(1, result.total_voxels)
    typer.echo(f"wrote {result.path} (kidney: {result.kidney_voxels} voxels, {share:.1f} %)")


@app.command()
def pretrain(
    cohort: Annotated[
        Path, typer.Option("--cohort", help="Folder of case folders with reference poses.")
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Checkpoint (.pt), rewritten every epoch; log beside.")
    ],
    profile: Annotated[
        str, typer.Option("--profile", help="Resolution profile: paper, cpu or tiny.")
    ] = "cpu",
    epochs: Annotated[int, typer.Option("--epochs", help="Total epochs.")] = 10,
    pairs: Annotated[
        int, typer.Option("--pairs", help="Generated pairs per epoch (paper: ~12000).")
    ] = 1000,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Windows per step (per process).")
    ] = 2,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 3e-4,
    seed: Annotated[int, typer.Option("--seed", help="Seed of split, weights and pairs.")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run saved in --out.")
    ] = False,
    no_mind: Annotated[
        bool, typer.Option("--no-mind", help="Ablation: without the MIND image loss.")
    ] = False,
    no_decoder: Annotated[
        bool, typer.Option("--no-decoder", help="Ablation: without decoder layers.")
    ] = False,
    no_hierarchical: Annotated[
        bool, typer.Option("--no-hierarchical", help="Ablation: last level's head only.")
    ] = False,
    window: Annotated[
        int | None, typer.Option("--window", help="U/S frames per window: 1, 3 or 5.")
    ] = None,
    features: Annotated[
        str, typer.Option("--features", help="Feature maps: masks (ground truth) or network.")
    ] = "masks",
    images: Annotated[
        bool,
        typer.Option(
            "--images", help="Feed the U/S and CT images to the network beside the feature maps."
        ),
    ] = False,
    sinus: Annotated[
        bool,
        typer.Option(
            "--sinus",
            help="Add renal-sinus maps beside the kidney maps (from the cases' label maps; "
            "--features masks).",
        ),
    ] = False,
    ct_feature_model: Annotated[
        Path | None, typer.Option("--ct-feature-model", help="CT feature net (--features network).")
    ] = None,
    us_feature_model: Annotated[
        Path | None,
        typer.Option("--us-feature-model", help="U/S feature net (--features network)."),
    ] = None,
    supervision: Annotated[
        float,
        typer.Option(
            "--supervision",
            help="Weight of each generated pair's known pose (0: the paper's unsupervised loss).",
        ),
    ] = 1.0,
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", help="Share of patients held out.")
    ] = 0.2,
    workers: Annotated[
        int | None, typer.Option("--workers", help="DataLoader workers (default: auto).")
    ] = None,
    export: Annotated[
        Path | None,
        typer.Option("--export", help="Also write a compact copy of the best model (bundling)."),
    ] = None,
    initial: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="Start from this registration model's weights (fine-tuning), not random ones.",
        ),
    ] = None,
) -> None:
    """Pretrain the registration network on generated pairs (run under torchrun for DDP)."""
    import os

    from kidneyreg.registration.train import export_model, log_path
    from kidneyreg.registration.train import pretrain as run_pretrain

    if profile not in ("paper", "cpu", "tiny"):
        raise InputError("--profile", f"must be paper, cpu or tiny, got {profile!r}")
    if window is not None and window not in (1, 3, 5):
        raise InputError("--window", f"must be 1, 3 or 5, got {window}")
    if features not in ("masks", "network"):
        raise InputError("--features", f"must be masks or network, got {features!r}")
    if features != "network" and (ct_feature_model or us_feature_model):
        raise InputError("--ct-feature-model", "only applies with --features network")
    if workers is not None and workers < 0:
        raise InputError("--workers", f"must be >= 0, got {workers}")
    models = None
    if features == "network" and (ct_feature_model or us_feature_model):
        from kidneyreg.features.infer import load_feature_model
        from kidneyreg.registration.pairs import FeatureModels

        models = FeatureModels(
            load_feature_model(ct_feature_model, modality="ct", profile=profile),
            load_feature_model(us_feature_model, modality="us", profile=profile),
        )
    result = run_pretrain(
        cohort,
        out,
        profile=profile,
        epochs=epochs,
        pairs=pairs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        val_fraction=val_fraction,
        resume=resume,
        num_workers=workers,
        features="network" if features == "network" else "masks",
        feature_models=models,
        supervision=supervision,
        initial_weights=initial,
        window=window,
        use_mind=not no_mind,
        use_decoder=not no_decoder,
        hierarchical=not no_hierarchical,
        config_overrides={
            **({"use_images": True} if images else {}),
            **({"structures": ("kidney", "sinus")} if sinus else {}),
        },
        log=typer.echo,
    )
    if int(os.environ.get("RANK", "0") or 0) == 0:
        typer.echo(f"wrote {result.checkpoint} and {log_path(result.checkpoint)}")
        if export is not None:
            typer.echo(f"wrote {export_model(result.checkpoint, export)}")


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Show the warnings raised inside at once, as ``warning: <message>`` lines on stderr."""
    seen: set[str] = set()

    def show(message: Warning | str, *_args: Any, **_kwargs: Any) -> None:
        text = " ".join(str(message).split())
        if text not in seen:
            seen.add(text)
            # tqdm.write keeps the line apart from a progress bar drawn on stderr.
            from tqdm import tqdm

            tqdm.write(f"warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield


_KIDNEY_HELP = "Kidney to register: auto (nearest the --init pose, else right), right or left."
_INIT_HELP = "Coarse initial pose(s) (transforms.json schema: one frame for all, or one per frame)."

# Options shared by register and adapt.
_CtOption = Annotated[
    Path, typer.Option("--ct", help="CT volume (NIfTI/NRRD/MHA or DICOM folder).")
]
_UsOption = Annotated[
    Path, typer.Option("--us", help="U/S sequence (3D image, DICOM, video or PNG folder).")
]
_CtMaskOption = Annotated[
    Path | None,
    typer.Option(
        "--ct-mask",
        help="CT kidney mask (else the CT feature network); a parenchyma-only mask "
        "(TotalSegmentator's) gets its renal sinus filled in.",
    ),
]
_UsMaskOption = Annotated[
    Path | None,
    typer.Option(
        "--us-mask",
        help="U/S kidney masks (else the U/S feature network). Without --ct-mask the CT "
        "network's map is then cut back to the capsule by the CT's HU.",
    ),
]
_CtSinusMaskOption = Annotated[
    Path | None,
    typer.Option(
        "--ct-sinus-mask",
        help="CT renal-sinus mask (sinus fat + collecting system); with --us-sinus-mask, a "
        "plane search on kidney and sinus overlap follows the adaptation.",
    ),
]
_UsSinusMaskOption = Annotated[
    Path | None,
    typer.Option(
        "--us-sinus-mask",
        help="U/S renal-sinus masks; without --ct-sinus-mask the CT's sinus is read from its "
        "HU inside the kidney map.",
    ),
]
_SinusNetworksOption = Annotated[
    bool,
    typer.Option(
        "--sinus-networks/--no-sinus-networks",
        help="Renal-sinus maps from feature networks where no sinus mask is given, for the plane "
        "search after adaptation (experimental: the networks trained so far made it worse; see "
        "docs/models.md).",
    ),
]
_CtSinusFeaturesOption = Annotated[
    Path | None,
    typer.Option(
        "--ct-sinus-features",
        help="CT sinus feature network (implies --sinus-networks; default: the sinus read from "
        "the CT's HU inside the kidney map).",
    ),
]
_UsSinusFeaturesOption = Annotated[
    Path | None,
    typer.Option(
        "--us-sinus-features",
        help="U/S sinus feature network (default: the bundled one; implies --sinus-networks).",
    ),
]
_UsSpacingOption = Annotated[
    float | None,
    typer.Option("--us-spacing", help="U/S pixel size in mm (video/PNG/uncalibrated DICOM)."),
]
_InitOption = Annotated[Path | None, typer.Option("--init", help=_INIT_HELP)]
_CtFeaturesOption = Annotated[
    Path | None,
    typer.Option("--ct-features", help="CT feature-net checkpoint (default: bundled)."),
]
_UsFeaturesOption = Annotated[
    Path | None,
    typer.Option(
        "--us-features",
        help="U/S feature-net checkpoint (default: the bundled one for the view, sagittal or "
        "flank, nearest to the --init plane).",
    ),
]
_DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
_ModelProfileOption = Annotated[
    str | None,
    typer.Option("--profile", help="paper, cpu or tiny (default: the model's profile)."),
]
_KidneyOption = Annotated[str, typer.Option("--kidney", help=_KIDNEY_HELP)]
_AnchorOption = Annotated[
    float | None,
    typer.Option(
        "--anchor",
        help="Adaptation pull towards the pretrained estimates (0: the paper's; default 0 "
        "with --us-mask, 0.1 with the U/S feature network).",
    ),
]


def _registrar_inputs(
    *,
    ct: Path,
    us: Path,
    ct_mask: Path | None,
    us_mask: Path | None,
    us_spacing: float | None,
    init: Path | None,
    model: Path | None,
    ct_features: Path | None,
    us_features: Path | None,
    device: str,
    profile: str | None,
    kidney: str,
    refinements: int | None = None,
    frame_step: int = 1,
    ct_sinus_mask: Path | None = None,
    sinus_networks: bool = False,
    ct_sinus_features: Path | None = None,
    us_sinus_features: Path | None = None,
) -> tuple[Any, Any, Any, Any]:
    """Read every input and build the registrar: ``(registrar, ct image, sequence, us masks)``.

    Everything is read and checked before anything is written, so bad input leaves no output.
    """
    from kidneyreg.io.image import read_ct, read_mask
    from kidneyreg.io.transforms import read_transforms_json
    from kidneyreg.io.us import read_us_mask, read_us_sequence
    from kidneyreg.pipeline import (
        KIDNEY_CHOICES,
        MAX_FRAME_STEP,
        Registrar,
        load_registration_model,
    )

    if refinements is not None and refinements < 0:
        raise InputError("--refinements", f"must be >= 0, got {refinements}")
    if not 1 <= frame_step <= MAX_FRAME_STEP:
        raise InputError("--frame-step", f"must be in 1..{MAX_FRAME_STEP}, got {frame_step}")
    if profile is not None and profile not in ("paper", "cpu", "tiny"):
        raise InputError("--profile", f"must be paper, cpu or tiny, got {profile!r}")
    if kidney not in KIDNEY_CHOICES:
        raise InputError("--kidney", f"must be one of {', '.join(KIDNEY_CHOICES)}, got {kidney!r}")
    if us_spacing is not None and not us_spacing > 0:
        raise InputError("--us-spacing", f"must be a positive pixel size in mm, got {us_spacing}")
    reg_model = load_registration_model(model, profile=profile)
    ct_image = read_ct(ct)
    ct_kidney = None if ct_mask is None else read_mask(ct_mask, ct_image, kind="kidney mask")
    ct_sinus = (
        None if ct_sinus_mask is None else read_mask(ct_sinus_mask, ct_image, kind="sinus mask")
    )
    sequence = read_us_sequence(us, spacing=us_spacing, min_frames=int(reg_model.profile.window))
    masks = None if us_mask is None else read_us_mask(us_mask, sequence)
    init_poses = None
    if init is not None:
        init_poses = read_transforms_json(init).broadcast_to(sequence.n_frames)
    registrar = Registrar(
        ct_image,
        reg_model,
        ct_mask=ct_kidney,
        ct_features=ct_features,
        # Exact U/S outlines need the CT map's outline exact too (Registrar's trim_ct_fat).
        trim_ct_fat=ct_mask is None and us_mask is not None,
        us_features=us_features,
        device=device,
        init=init_poses,
        kidney=kidney,
        refinements=refinements,
        frame_step=frame_step,
        ct_source=str(ct),
        ct_mask_source=str(ct_mask),
        ct_sinus_mask=ct_sinus,
        ct_sinus_mask_source=str(ct_sinus_mask),
        sinus_networks=sinus_networks,
        ct_sinus_features=ct_sinus_features,
        us_sinus_features=us_sinus_features,
        log=typer.echo,
    )
    return registrar, ct_image, sequence, masks


def _check_adapt_options(
    strategy: str, epochs: int | None, anchor: float | None, *, prefix: str = ""
) -> None:
    """Validate the adaptation options of ``register`` (``prefix="adapt-"``) and ``adapt``."""
    from kidneyreg.adapt import STRATEGIES

    if strategy not in STRATEGIES:
        raise InputError(f"--{prefix}strategy", f"must be one of {', '.join(STRATEGIES)}")
    if epochs is not None and epochs < 1:
        raise InputError(f"--{prefix}epochs", f"must be at least 1, got {epochs}")
    if anchor is not None and not anchor >= 0:
        raise InputError("--anchor", f"must be >= 0, got {anchor}")


def _adapt_with_progress(
    registrar: Any, prepared: Any, strategy: str, epochs: int | None, anchor: float | None
) -> Any:
    """Run :meth:`Registrar.adapt` under a progress bar; returns its record."""
    from tqdm import tqdm

    with tqdm(desc="adapt", unit="step") as bar:

        def update(step: int, total: int, loss: float) -> None:
            bar.total = total
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")

        return registrar.adapt(
            prepared,
            strategy=strategy,
            epochs=epochs,
            anchor_weight=anchor,
            progress=update,
        )


@app.command()
def register(
    ct: _CtOption,
    us: _UsOption,
    out: Annotated[Path, typer.Option("--out", help="Output folder (transforms.json and more).")],
    ct_mask: _CtMaskOption = None,
    us_mask: _UsMaskOption = None,
    us_spacing: _UsSpacingOption = None,
    init: _InitOption = None,
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Registration checkpoint (default: the bundled model)."),
    ] = None,
    ct_sinus_mask: _CtSinusMaskOption = None,
    us_sinus_mask: _UsSinusMaskOption = None,
    sinus_networks: _SinusNetworksOption = False,
    ct_sinus_features: _CtSinusFeaturesOption = None,
    us_sinus_features: _UsSinusFeaturesOption = None,
    ct_features: _CtFeaturesOption = None,
    us_features: _UsFeaturesOption = None,
    no_adapt: Annotated[
        bool, typer.Option("--no-adapt", help="Skip the transfer learning on the first cycle.")
    ] = False,
    adapt_strategy: Annotated[
        str,
        typer.Option("--adapt-strategy", help="one-cycle (2 epochs), one-shot or five-shot (5)."),
    ] = "one-cycle",
    adapt_epochs: Annotated[
        int | None,
        typer.Option("--adapt-epochs", help="Adaptation epochs (default: the strategy's)."),
    ] = None,
    device: _DeviceOption = "auto",
    profile: _ModelProfileOption = None,
    kidney: _KidneyOption = "auto",
    video: Annotated[
        bool, typer.Option("--video/--no-video", help="Write overlays/overlay.mp4.")
    ] = True,
    anchor: _AnchorOption = None,
    refinements: Annotated[
        int | None,
        typer.Option(
            "--refinements",
            help="Extra network passes per frame on the CT moved by the last estimate "
            "(default: 1 with --no-adapt, 0 after adaptation; 0: the paper's single pass).",
        ),
    ] = None,
    frame_step: Annotated[
        int,
        typer.Option(
            "--frame-step",
            help="Run the network on every N-th frame (and the last) and interpolate the poses "
            "of the frames between (1: every frame, the paper's; 3: a third of the calls).",
        ),
    ] = 1,
) -> None:
    """Register every U/S frame to the CT (one-cycle adaptation first, unless --no-adapt)."""
    from tqdm import tqdm

    from kidneyreg.io.us import read_us_mask
    from kidneyreg.results import write_registration_outputs

    _check_adapt_options(adapt_strategy, adapt_epochs, anchor, prefix="adapt-")
    with_networks = sinus_networks or ct_sinus_features or us_sinus_features
    if ct_sinus_mask is not None and us_sinus_mask is None and not with_networks:
        # The U/S sinus has no fallback; the CT's is read from its HU when not given.
        raise InputError("--ct-sinus-mask", "needs --us-sinus-mask or --sinus-networks")
    with _one_line_warnings():
        registrar, ct_image, sequence, masks = _registrar_inputs(
            ct=ct,
            us=us,
            ct_mask=ct_mask,
            us_mask=us_mask,
            us_spacing=us_spacing,
            init=init,
            model=model,
            ct_features=ct_features,
            us_features=us_features,
            device=device,
            profile=profile,
            kidney=kidney,
            refinements=refinements,
            frame_step=frame_step,
            ct_sinus_mask=ct_sinus_mask,
            sinus_networks=sinus_networks,
            ct_sinus_features=ct_sinus_features,
            us_sinus_features=us_sinus_features,
        )
        us_sinus = None if us_sinus_mask is None else read_us_mask(us_sinus_mask, sequence)
        prepared = registrar.prepare(
            sequence, masks, sinus_masks=us_sinus, sinus_source=str(us_sinus_mask)
        )
        if not no_adapt:
            # With sinus masks on both sides the adaptation ends with the plane search.
            _adapt_with_progress(registrar, prepared, adapt_strategy, adapt_epochs, anchor)
        elif registrar.ct_sinus_mask is not None and prepared.sinus is not None:
            registrar.search_plane(prepared)
        with tqdm(total=sequence.n_frames, desc="register", unit="frame") as bar:
            result = registrar.register(
                prepared, progress=lambda done, _n: bar.update(done - bar.n)
            )
        paths = write_registration_outputs(
            out,
            result,
            ct_image,
            sequence,
            ct_kidney_mask=registrar.ct_kidney_mask,
            us_masks=prepared.kidney_masks(),
            video=video,
        )
    timing = result.timing
    adapted = (
        "no adaptation"
        if result.adaptation == "none"
        else f"{result.adaptation} adaptation {timing['adaptation_s']:.1f} s"
    )
    typer.echo(
        f"registered {result.n_frames} frames ({adapted}, "
        f"{timing['ms_per_frame']:.0f} ms per frame)"
    )
    typer.echo(f"wrote {paths['transforms']} and {len(paths) - 1} more output(s) in {out}")


@app.command()
def demo(
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output folder, replaced by each run (default: demo_output)."),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option("--seed", help="Seed of the simulated patient (default: a fixed one)."),
    ] = None,
    profile: Annotated[
        str, typer.Option("--profile", help="Resolution profile: paper, cpu or tiny.")
    ] = "cpu",
    frames: Annotated[
        int | None,
        typer.Option("--frames", help="U/S frames (default: two breathing cycles)."),
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Registration checkpoint (default: the bundled model)."),
    ] = None,
    ct_features: _CtFeaturesOption = None,
    us_features: _UsFeaturesOption = None,
    approach: Annotated[
        str,
        typer.Option(
            "--approach",
            help="sagittal (default), or flank: the patient scanned from the flank and "
            "registered from its init.json.",
        ),
    ] = "sagittal",
    no_adapt: Annotated[
        bool, typer.Option("--no-adapt", help="Skip the transfer learning on the first cycle.")
    ] = False,
    video: Annotated[
        bool, typer.Option("--video/--no-video", help="Write the overlay video.")
    ] = True,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
) -> None:
    """The main job: simulate a patient, register it (one-cycle adaptation), evaluate, report."""
    from tqdm import tqdm

    from kidneyreg.demo import DEFAULT_OUT, DEFAULT_SEED, DemoSettings, run_demo

    settings = DemoSettings(
        out=DEFAULT_OUT if out is None else out,
        seed=DEFAULT_SEED if seed is None else seed,
        profile=profile,
        frames=frames,
        model=model,
        ct_features=ct_features,
        us_features=us_features,
        approach=approach,
        adapt=not no_adapt,
        video=video,
        device=device,
    )
    bars: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            unit = "step" if stage == "adapt" else "frame"
            bar = bars[stage] = tqdm(total=total, desc=stage, unit=unit)
        bar.total = total
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    with _one_line_warnings():
        result = run_demo(settings, log=typer.echo, progress=progress)
    typer.echo("")
    typer.echo(result.summary_text())
    timing = result.timings
    typer.echo(
        f"adaptation {timing.get('adaptation_s', 0.0):.1f} s, {timing['ms_per_frame']:.0f} ms "
        f"per frame, total {timing['total_s']:.0f} s"
    )
    typer.echo(f"report: {result.report_html}")


@app.command()
def adapt(
    ct: _CtOption,
    us: _UsOption,
    model: Annotated[Path, typer.Option("--model", help="Pretrained registration checkpoint.")],
    out: Annotated[Path, typer.Option("--out", help="Adapted checkpoint to write (.pt).")],
    ct_mask: _CtMaskOption = None,
    us_mask: _UsMaskOption = None,
    us_spacing: _UsSpacingOption = None,
    init: _InitOption = None,
    ct_features: _CtFeaturesOption = None,
    us_features: _UsFeaturesOption = None,
    strategy: Annotated[
        str,
        typer.Option("--strategy", help="one-cycle (2 epochs), one-shot or five-shot (5)."),
    ] = "one-cycle",
    epochs: Annotated[
        int | None, typer.Option("--epochs", help="Epochs (default: the strategy's).")
    ] = None,
    device: _DeviceOption = "auto",
    profile: _ModelProfileOption = None,
    kidney: _KidneyOption = "auto",
    anchor: _AnchorOption = None,
) -> None:
    """Fine-tune a pretrained model on the first breathing cycle of a sequence and save it."""
    from kidneyreg.adapt import save_adapted_model

    _check_adapt_options(strategy, epochs, anchor)
    with _one_line_warnings():
        registrar, _, sequence, masks = _registrar_inputs(
            ct=ct,
            us=us,
            ct_mask=ct_mask,
            us_mask=us_mask,
            us_spacing=us_spacing,
            init=init,
            model=model,
            ct_features=ct_features,
            us_features=us_features,
            device=device,
            profile=profile,
            kidney=kidney,
        )
        prepared = registrar.prepare(sequence, masks)
        record = _adapt_with_progress(registrar, prepared, strategy, epochs, anchor)
        save_adapted_model(
            out,
            registrar.net,
            profile=registrar.profile.name,
            record=record,
            base_model=registrar.model.source,
            training=registrar.model.training,
        )
    losses = record.epoch_losses
    typer.echo(
        f"adapted on {len(record.frames)} window(s), {record.steps} steps in "
        f"{record.seconds:.1f} s (loss {losses[0]:.4f} -> {losses[-1]:.4f} per epoch)"
    )
    typer.echo(f"wrote {out}")


# Paragraphs as single lines: the help formatter rewraps them but keeps explicit newlines.
_BENCHMARK_HELP = "\n\n".join(
    [
        "The paper's tables (Table 2-4, Appendix F-H) on held-out simulated patients.",
        "Patients are split into folds (the paper's fivefold cross validation); for each fold "
        "every distinct pretraining runs once on the other folds, then each held-out case is "
        "registered with every method variant and scored against its ground truth on the frames "
        "after the adaptation cycle. The ground-truth kidney masks are the feature maps, so the "
        "tables measure registration alone. Writes benchmark.md, benchmark.html, one CSV per "
        "table, frames.csv, figures/ and config.json into --out (replaced only at the end of a "
        "successful run); a stopped run restarted with the same options continues from its work "
        "folder beside --out.",
        "Full setting (defaults): --profile cpu, 5 folds, 20 simulated cases (half group A, half "
        "group B, two breathing cycles each), 2 epochs of 1000 pairs, 3 Appendix H repeats, the "
        "paper's adaptation epochs. With every table each fold runs 6 + repeats pretrainings of "
        "epochs x pairs / batch-size steps, about 1 s each on one shared CPU core at the cpu "
        "profile (4-15 min per pretraining, measured), then registers each held-out case "
        "with 13 adapted variants (7-8 min per case): 2.2 core-hours per fold, about 11 for "
        "all tables (--tables table2,table3,table4,appF needs 4 pretrainings per fold). Several "
        "processes may run the same command at once, one per core: they share each fold by "
        "pretraining and by held-out case (file locks: one simulates the cohort while the "
        "others wait; each skips what another is doing and waits for it at the end of the "
        "fold); --only-fold limits a process to some folds. A fold whose cases are all "
        "registered is kept as small JSON files (results/, trainings/) in the work folder. "
        "--device cuda runs the same steps on a GPU (not timed here: no GPU was available).",
        "--quick: a tiny cohort and network for CI (about a minute); a structure check, not a "
        "result.",
    ]
)


@app.command(help=_BENCHMARK_HELP)
def benchmark(
    out: Annotated[Path, typer.Option("--out", help="Output folder (replaced on success).")],
    cohort: Annotated[
        Path | None,
        typer.Option(
            "--cohort", help="Cohort of case folders with ground truth (default: simulate)."
        ),
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Tiny CI setting: tiny profile, 4 cases, 2 folds.")
    ] = False,
    profile: Annotated[
        str | None,
        typer.Option("--profile", help="Resolution profile: paper, cpu or tiny (default cpu)."),
    ] = None,
    folds: Annotated[
        int | None, typer.Option("--folds", help="Cross-validation folds (default 5).")
    ] = None,
    cases: Annotated[
        int | None, typer.Option("--cases", help="Cases to simulate without --cohort (default 20).")
    ] = None,
    frames: Annotated[
        int | None,
        typer.Option("--frames", help="Frames per simulated case (default: two breathing cycles)."),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", help="Pretraining epochs (default 2).")
    ] = None,
    pairs: Annotated[
        int | None, typer.Option("--pairs", help="Generated pairs per epoch (default 1000).")
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Pretraining windows per step.")
    ] = 2,
    supervision: Annotated[
        float,
        typer.Option(
            "--supervision", help="Pretraining pose supervision weight (0: the paper's loss)."
        ),
    ] = 1.0,
    repeats: Annotated[
        int | None, typer.Option("--repeats", help="Appendix H repeats (default 3; paper 10).")
    ] = None,
    adapt_epochs: Annotated[
        int | None,
        typer.Option("--adapt-epochs", help="Adaptation epochs (default: 2 one-cycle, 5 shots)."),
    ] = None,
    tables: Annotated[
        str,
        typer.Option("--tables", help="Comma-separated: table2,table3,table4,appF,appG,appH."),
    ] = "table2,table3,table4,appF,appG,appH",
    seed: Annotated[int, typer.Option("--seed", help="Seed of cohort, folds and training.")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    baselines: Annotated[
        list[Path] | None,
        typer.Option("--baselines", help="Baseline per-frame results CSV (repeatable)."),
    ] = None,
    keep_work: Annotated[
        bool, typer.Option("--keep-work", help="Keep the work folder (cohort, checkpoints).")
    ] = False,
    only_fold: Annotated[
        list[int] | None,
        typer.Option(
            "--only-fold",
            help="Run only this fold (0-based, repeatable) into the work folder, no report: "
            "parallel processes each take some folds, then a run without it writes the report.",
        ),
    ] = None,
) -> None:
    from kidneyreg.evaluation.benchmark import run_benchmark

    result = run_benchmark(
        cohort,
        out,
        quick=quick,
        profile=profile,
        folds=folds,
        cases=cases,
        frames=frames,
        epochs=epochs,
        pairs=pairs,
        batch_size=batch_size,
        supervision=supervision,
        repeats=repeats,
        adapt_epochs=adapt_epochs,
        tables=tables.split(","),
        seed=seed,
        device=device,
        baselines=baselines or [],
        keep_work=keep_work,
        only_folds=only_fold,
        progress=not quick,
        log=typer.echo,
    )
    if result is None:
        return
    typer.echo("")
    typer.echo(result.headline.to_markdown())
    typer.echo("")
    typer.echo(f"wrote {result.markdown}")


def main() -> None:
    """Entry point: run the app, turning input errors into one line and exit status 2."""
    try:
        app()
    except InputError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
