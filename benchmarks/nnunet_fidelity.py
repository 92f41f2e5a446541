"""tilemask's ``model: {nnunet: FOLDER}`` against nnU-Net v2's own ``nnUNetPredictor`` (a manual check).

Builds a real nnU-Net v2 results folder: a raw dataset of one case (nibabel's ``anatomical.nii``, a real MRI,
33 x 41 x 25 at 2 mm, with a label image thresholded from it), nnU-Net's fingerprint extraction and
``ExperimentPlanner`` write ``plans.json`` and ``dataset.json``; a network built by nnU-Net's
``get_network_from_plans`` with nnU-Net's random initialization is saved as ``fold_0/checkpoint_final.pth`` in
the structure ``nnUNetTrainer.save_checkpoint`` writes.  Then nnU-Net predicts the case (tile step 0.5, gaussian,
mirroring as ``nnUNetPredictor`` does by default, or off with ``--no-mirroring``) and tilemask runs the folder (its
defaults, which mirror as nnU-Net does; ``inference.tta: none`` with ``--no-mirroring``); the labels are compared
voxel by voxel.

nnU-Net is not a tilemask dependency (it pins its own stack): install it beside, without touching the venv:

    pip install --no-deps --target /tmp/nnpkgs nnunetv2==2.8.1 dynamic-network-architectures==0.4.4 acvl-utils \\
        batchgenerators batchgeneratorsv2 einops yacs blosc2 threadpoolctl tqdm ndindex connected-components-3d

    PYTHONPATH=.:/tmp/nnpkgs python benchmarks/nnunet_fidelity.py [--scheme CT|MR] [--zooms 2 2 2] [--spacing ...]

(acvl-utils 0.2.6 imports ``cc3d``, connected-components-3d; ``nnUNetPredictor`` imports ``nnUNetTrainer`` to find
the trainer class, and its module imports matplotlib, seaborn and sklearn's ``KFold``, none of them used here:
install them too, or put empty stand-ins on the path: ``matplotlib/__init__.py`` with ``def use(*a, **k): pass``
and an empty ``matplotlib/pyplot.py``, an empty ``seaborn/__init__.py``, ``sklearn/model_selection.py`` with
``class KFold: pass``.)

``--zooms`` rewrites the scan's voxel size (the data unchanged) so that nnU-Net's planner transposes the axes
(its largest spacing first); ``--spacing`` sets the configuration's target spacing in plans.json (nnU-Net's axis
order), so both sides resample.  Further cases: ``--channels 2`` (a second modality, ``_0001``: the scan shifted by
three voxels along its first axis), ``--mask-for-norm`` (plans.json's ``use_mask_for_norm`` true), ``--ignore-label``
(dataset.json's ``ignore`` label), ``--regions`` (region-based training), ``--configuration 2d`` (the planner's,
predicted slice by slice; its trainer mirrors the two axes of a slice), ``--configuration 3d_lowres`` (a copy of
3d_fullres at ``--spacing``) or ``3d_cascade_fullres``, ``--fold all`` or ``--fold 0 1`` (several folds, each its own
seed, ensembled by nnU-Net), ``--checkpoint checkpoint_best.pth``.  A case tilemask refuses prints its refusal (and
nnU-Net's labels are not compared); the grids of the scan, of nnU-Net's labels and of tilemask's are compared too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.testing import data_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scheme", default="CT", help="the channel name: CT (CTNormalization) or MR (z-score)")
    parser.add_argument("--zooms", type=float, nargs=3, default=None, help="the scan's voxel size, rewritten")
    parser.add_argument("--spacing", type=float, nargs=3, default=None, help="plans.json's target spacing")
    parser.add_argument("--image", default="anatomical.nii", help="a scan of nibabel's test data (a 4D one: its first "
                        "volume), e.g. example4d.nii.gz (128 x 96 x 24, oblique, 2 x 2 x 2.2 mm)")
    parser.add_argument("--offset", type=int, default=0, help="added to the scan's values: 1 leaves no zero voxel, "
                        "so nnU-Net's crop to the nonzero voxels' bounding box keeps the whole scan")
    parser.add_argument("--patch", type=int, nargs=3, default=None, help="plans.json's patch size (several windows)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-mirroring", dest="mirroring", action="store_false",
                        help="both sides without mirroring (nnUNetv2_predict --disable_tta, tilemask's tta: none)")
    parser.add_argument("--keep", default=None, help="a folder to build in (kept), else a temporary one")
    parser.add_argument("--channels", type=int, default=1, help="input channels: the second is the scan shifted")
    parser.add_argument("--mask-for-norm", action="store_true", help="plans.json's use_mask_for_norm true")
    parser.add_argument("--ignore-label", action="store_true", help="dataset.json's labels with an ignore label")
    parser.add_argument("--regions", action="store_true", help="region-based training (tilemask refuses it)")
    parser.add_argument("--configuration", default="3d_fullres",
                        help="3d_fullres, 2d (the planner's), 3d_lowres (3d_fullres's copy) or 3d_cascade_fullres")
    parser.add_argument("--fold", nargs="+", default=["0"], help="the folds trained and run: 0, all, 0 1 (ensemble)")
    parser.add_argument("--checkpoint", default="checkpoint_final.pth", help="or checkpoint_best.pth")
    args = parser.parse_args()
    args.fold = [f if f == "all" else int(f) for f in args.fold]
    root = Path(args.keep or tempfile.mkdtemp(prefix="nnunet_fidelity_"))
    os.environ.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
                      nnUNet_results=str(root / "results"))  # fmt: skip
    folder = build(root, args)
    case_dir = root / "imagesTs"
    ours = run_tilemask(root, folder, case_dir, args)
    if ours is None:
        return
    theirs = run_nnunet(root, folder, case_dir, args)
    scan, mine, nn = (nib.load(f) for f in (case_dir / "anat_001_0000.nii.gz", ours, theirs))
    for name, image in (("scan", scan), ("tilemask", mine), ("nnU-Net", nn)):
        print(f"{name}: shape {image.shape} dtype {image.get_data_dtype()} qform/sform codes "
              f"{int(image.header['qform_code'])}/{int(image.header['sform_code'])}")
    print("affine tilemask - scan: max", float(np.abs(mine.affine - scan.affine).max()),
          "| nnU-Net - scan:", float(np.abs(nn.affine - scan.affine).max()))  # fmt: skip
    a, b = np.asarray(mine.dataobj), np.asarray(nn.dataobj)
    assert a.shape == b.shape, (a.shape, b.shape)
    apart = int((a != b).sum())
    print(f"labels: {a.size} voxels, {apart} apart ({100 * apart / a.size:.3f} %); classes tilemask "
          f"{np.bincount(a.ravel().astype(int)).tolist()}, nnU-Net {np.bincount(b.ravel().astype(int)).tolist()}")


def build(root: Path, args) -> Path:
    """The raw dataset, nnU-Net's plans for it and a randomly initialized network per fold (``--fold``): the results
    folder."""
    import torch

    image = nib.load(os.path.join(data_path, args.image))
    data = np.asarray(image.dataobj).astype(np.int16)
    data = (data[..., 0] if data.ndim == 4 else data) + np.int16(args.offset)
    affine = image.affine.copy()
    if args.zooms:
        affine[:3, :3] = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0) * np.asarray(args.zooms)
    raw = root / "raw" / "Dataset999_Anat"
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    (root / "imagesTs").mkdir(exist_ok=True)
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    for c in range(args.channels):  # the second modality: the scan shifted along its first axis (other zeros)
        channel = np.roll(data, 3 * c, axis=0)
        for folder, case in ((raw / "imagesTr", "anat_000"), (root / "imagesTs", "anat_001")):
            nib.save(nib.Nifti1Image(channel, affine, header), folder / f"{case}_{c:04d}.nii.gz")
    labels = np.digitize(data, np.percentile(data, [50, 80])).astype(np.uint8)
    nib.save(nib.Nifti1Image(labels, affine), raw / "labelsTr" / "anat_000.nii.gz")
    names = {"background": 0, "grey": 1, "bright": 2}
    if args.ignore_label:
        names["ignore"] = 3
    if args.regions:
        names = {"background": 0, "head": [1, 2], "bright": 2}
    dataset = {"channel_names": {str(c): args.scheme for c in range(args.channels)}, "labels": names,
               "numTraining": 1, "file_ending": ".nii.gz", **({"regions_class_order": [1, 2]} if args.regions else {})}
    (raw / "dataset.json").write_text(json.dumps(dataset))

    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    extract_fingerprints([999], check_dataset_integrity=True, clean=True, verbose=False)
    plans_path = root / "preprocessed" / "Dataset999_Anat" / "nnUNetPlans.json"
    plan_experiments([999])
    plans = json.loads(plans_path.read_text())
    if args.spacing:
        plans["configurations"]["3d_fullres"]["spacing"] = list(args.spacing)
    if args.patch:
        plans["configurations"]["3d_fullres"]["patch_size"] = list(args.patch)
    if args.mask_for_norm:
        plans["configurations"]["3d_fullres"]["use_mask_for_norm"] = [True] * args.channels
    configurations = plans["configurations"]
    if args.configuration in ("3d_lowres", "3d_cascade_fullres"):  # the planner drops them for so small a scan
        configurations["3d_lowres"] = {**configurations["3d_fullres"], "next_stage": "3d_cascade_fullres"}
        configurations["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    plans_path.write_text(json.dumps(plans, indent=4))
    folder = root / "results" / "Dataset999_Anat" / f"nnUNetTrainer__nnUNetPlans__{args.configuration}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(plans_path.read_text())
    (folder / "dataset.json").write_text((raw / "dataset.json").read_text())
    config = {**plans["configurations"]["3d_fullres"], **plans["configurations"][args.configuration]}
    print("plans: transpose_forward", plans["transpose_forward"], "patch", config["patch_size"], "spacing",
          config["spacing"], "normalization", config["normalization_schemes"], config["use_mask_for_norm"])
    architecture = config["architecture"]
    outputs = 2 if args.regions else 3
    for i, fold in enumerate(args.fold):
        (folder / f"fold_{fold}").mkdir(exist_ok=True)
        torch.manual_seed(args.seed + i)
        network = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                         architecture["_kw_requires_import"], args.channels, outputs, allow_init=True,
                                         deep_supervision=False)  # fmt: skip
        save(network, plans, args, fold, folder / f"fold_{fold}" / args.checkpoint, json.loads(
            (raw / "dataset.json").read_text()))
    return folder


def save(network, plans: dict, args, fold, path: Path, dataset: dict) -> None:
    """As ``nnUNetTrainer.save_checkpoint`` writes it."""
    import torch

    torch.save({"network_weights": network.state_dict(), "optimizer_state": None, "grad_scaler_state": None,
                "logging": {}, "_best_ema": None, "current_epoch": 1000,
                "init_args": {"plans": plans, "configuration": args.configuration, "fold": fold,
                              "dataset_json": dataset, "device": torch.device("cpu")},
                "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": tuple(range(len(
                    plans["configurations"][args.configuration].get("patch_size") or [0] * 3)))}, path)  # fmt: skip


def run_nnunet(root: Path, folder: Path, cases: Path, args) -> Path:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=args.mirroring,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                allow_tqdm=False)  # fmt: skip
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=tuple(args.fold),
                                                   checkpoint_name=args.checkpoint)  # fmt: skip
    out = root / "nnunet_out"
    predictor.predict_from_files(str(cases), str(out), save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=1, num_processes_segmentation_export=1)  # fmt: skip
    return out / "anat_001.nii.gz"


def run_tilemask(root: Path, folder: Path, cases: Path, args) -> Path | None:
    """tilemask's labels, or None where it refuses the folder (exit 2, its one line printed)."""
    workflow = root / "workflow.yaml"
    fold = args.fold[0] if len(args.fold) == 1 else args.fold
    workflow.write_text(json.dumps({
        "version": 1, "input": {"channels": [str(cases / f"{{case}}_{c:04d}.nii.gz") for c in range(args.channels)]},
        "model": {"nnunet": str(folder), "fold": fold, "checkpoint": args.checkpoint},
        "inference": {"device": "cpu", **({} if args.mirroring else {"tta": "none"})},
        "output": {"path": str(root / "tilemask_out" / "{stem}.nii.gz")},
    }))  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "tilemask", "run", str(workflow)], stderr=subprocess.PIPE, text=True)
    sys.stderr.write(done.stderr)
    if done.returncode == 2:
        print(f"tilemask refuses it (exit 2): {done.stderr.strip().splitlines()[-1]}")
        return None
    done.check_returncode()
    return root / "tilemask_out" / "anat_001.nii.gz"


if __name__ == "__main__":
    main()
