"""``brainage demo``: the bundled demo model on a sample head, end to end, offline.

By default it reads the sample phantom bundled in ``Resources/Samples`` (a synthetic head of
known age and sex, made by ``BrainAgeLib.synth.phantoms`` with a seed that no training phantom used);
``--generate`` makes a new phantom instead (needs nilearn's MNI152 template, no network). It
prints the predicted age and the brain-age gap, and says plainly that the demo model is trained
on synthetic phantoms and means nothing clinically.
"""
from __future__ import annotations

import argparse
import json

COMMAND = "demo"
HELP = "predict the brain age of a sample (synthetic) head with the bundled demo model"

#: The bundled sample head and its truth (also recorded in the model card).
SAMPLE_FILE = ("Samples", "sample_phantom_F67.nii.gz")
SAMPLE_AGE = 67.0
SAMPLE_SEX = "F"
SAMPLE_SEED = 900_067


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--generate", action="store_true",
                        help="make a new phantom head instead of using the bundled sample (needs nilearn)")
    parser.add_argument("--age", type=float, default=None, help="age (years) of the generated phantom (20-90)")
    parser.add_argument("--sex", default=None,
                        help="sex of the generated phantom: F, M (also female/male, any case) or unknown "
                             "(a female phantom, predicted as the mean of both sexes, as `predict` does)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the generated phantom (its 'person')")
    parser.add_argument("--no-skull", action="store_true", help="generate a skull-stripped phantom")
    parser.add_argument("--save-head", default=None, help="also write the head used to this NIfTI file")
    parser.add_argument("--model", default="demo", help="model name or .safetensors path (default: demo)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def sample_head():
    """The bundled sample head: (Volume, age in years, sex, description)."""
    from ..errors import BrainAgeError
    from ..io import load_volume
    from ..resources import resource_path

    path = resource_path(*SAMPLE_FILE)
    if not path.exists():
        raise BrainAgeError(f"{path}: the bundled sample head is missing; run `brainage demo --generate` instead")
    return load_volume(path), SAMPLE_AGE, SAMPLE_SEX, f"bundled sample phantom {path.name} (seed {SAMPLE_SEED})"


def generated_head(age: float, sex: str, seed: int, skull: bool = True):
    """A freshly generated phantom at 2 mm: (Volume, age, sex, description)."""
    from ..synth.phantoms import make_phantom

    phantom = make_phantom(age, sex, seed, spacing=2.0, skull=skull, with_tissue=False)
    return phantom.volume, float(age), sex, f"generated phantom (seed {seed}, {'with' if skull else 'without'} skull)"


def run(args: argparse.Namespace) -> int:
    from ..inference import predict
    from ..model.checkpoint import load_model
    from ..sex import parse_sex

    told_sex = None if args.sex is None else parse_sex(args.sex)  # bad input fails before any heavy work
    if args.generate or args.age is not None or args.sex is not None or args.seed is not None:
        age = 67.0 if args.age is None else args.age
        seed = 900_000 + int(age) if args.seed is None else args.seed
        phantom_sex = told_sex if told_sex in ("F", "M") else "F"
        volume, age, sex, description = generated_head(age, phantom_sex, seed, skull=not args.no_skull)
    else:
        volume, age, sex, description = sample_head()
    if args.save_head:
        from ..io import save_volume

        save_volume(volume, args.save_head)
    model = load_model(args.model)
    result = predict(model, volume, sex=told_sex or sex, age=age, device=args.device)
    if args.json:
        print(json.dumps({"head": description, **result.to_dict()}, indent=2))
        return 0
    print(f"Head: {description}; true age {age:g} years, sex {sex}")
    print(result.summary())
    if not result.model_is_demo:
        print("NOTE: the head is a synthetic phantom, not a scan of a person.")
    print(f"Time: {result.timings.get('total', float('nan')):.1f} s")
    return 0
