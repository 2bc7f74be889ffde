"""Every file and folder the pipeline reads or writes, relative to the project root: one owner.

dvc.yaml names the same paths (its outs, metrics and plots); the stages write them, the phase
commands read them back from experiments' revisions. Standard library only, so the phase and
cluster commands name them without importing torch.
"""

from __future__ import annotations

from pathlib import Path

# prepare: the folder dvc.yaml's prepare stage depends on (kept in Git by its README.md, so it
# exists in every clone; images and masks go in `dvc add`ed subfolders), and its output.
INPUT_DIR = Path("data/raw")
PREPARED_DIR = Path("data/prepared")

# train
MODELS_DIR = Path("models")
BEST_CHECKPOINT = MODELS_DIR / "best.pt"  # lowest val MSE: what evaluate judges and exports
LAST_CHECKPOINT = MODELS_DIR / "last.pt"  # the latest eval step, with the optimiser state
TRAIN_LIVE_DIR = Path("results/train")  # dvclive
TRAIN_METRICS = TRAIN_LIVE_DIR / "metrics.json"
VAL_CURVES_DIR = TRAIN_LIVE_DIR / "plots/metrics/val"  # dvclive's per-metric .tsv files

# evaluate
EVALUATE_LIVE_DIR = Path("results/evaluate")  # dvclive
EVALUATE_METRICS = EVALUATE_LIVE_DIR / "metrics.json"
PER_IMAGE_CSV = EVALUATE_LIVE_DIR / "per_image.csv"  # one row per val image, worst PSNR first
PER_IMAGE_PAIRING_KEY = "path"  # its column that pairs two candidates' rows: the val image
# dvclive's `log_image(name)` writes plots/images/<name>.
RECONSTRUCTIONS_NAME = "reconstructions.png"
RECONSTRUCTIONS = EVALUATE_LIVE_DIR / "plots/images" / RECONSTRUCTIONS_NAME
LATENT_CHANNELS_NAME = "latent_channels.png"
EXPORT_PATH = Path("export/autoencoder.pt")  # the Phase 2 hand-off (dvc.yaml's artifact)

# probe: the diffusability probe of the exported autoencoder's latent
PROBE_LIVE_DIR = Path("results/probe")  # dvclive
PROBE_METRICS = PROBE_LIVE_DIR / "metrics.json"
PROBE_PER_IMAGE_CSV = PROBE_LIVE_DIR / "per_image.csv"  # probe.loss per val image, by path
PROBE_SAMPLES_NAME = "probe_samples.png"  # decoded samples of the probe's denoiser
PROBE_SAMPLES = PROBE_LIVE_DIR / "plots/images" / PROBE_SAMPLES_NAME

# cluster: the Slurm job logs and each drained experiment's log.
HPC_LOG_DIR = Path("hpc/logs")
# Preempted or paused trainings' resume snapshots, unless the job names a folder of its own.
RESUME_DIR = Path(".dvc/tmp/aeselect-resume")
