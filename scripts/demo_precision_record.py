"""Give the bundled demo model its CPU-precision record without touching its weights.

    python scripts/demo_precision_record.py [--card-only]

Measures, on this machine, how far each fast CPU precision (int8, native bf16, ONNX Runtime where
installed) moves the demo's age from float32 on the offline inputs every checkpoint is measured
on (``model.precision.default_inputs``: the bundled sample head, a resampling of it, and eight
generated phantoms of 25-85 years), and rewrites only the metadata of
``Resources/Models/brainage_demo.safetensors`` (``cpu_precisions``, which ``precision="auto"``
reads; the weights digest is checked to be unchanged) and the model card's section on it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from card_sections import replace_section  # noqa: E402

from BrainAgeLib.model.card_rewrite import rewrite_card  # noqa: E402
from BrainAgeLib.model.checkpoint import load_model, read_metadata  # noqa: E402
from BrainAgeLib.model.precision import AGREEMENT_YEARS, RECORD_KEY, choose_precision, measure_precisions  # noqa: E402

MODEL = REPO / "Resources" / "Models" / "brainage_demo.safetensors"
CARD = REPO / "Resources" / "Models" / "brainage_demo.md"
SECTION = "## CPU precisions"


def card_section(record: dict, chosen: str) -> str:
    fp32 = record["seconds"]["fp32"]
    rows = "\n".join(
        f"| {name} | {record['seconds'][name]:.1f} s ({fp32 / record['seconds'][name]:.2f}x) | {years:.3f} | "
        f"{'yes' if years <= AGREEMENT_YEARS else 'no'} |"
        for name, years in sorted(record["max_age_difference_years"].items()))
    features = ", ".join(name for name, present in record["cpu"].items() if present)
    return f"""{SECTION}
How far each fast CPU precision moves this model's age from float32, over {len(record['inputs'])} offline inputs
({'; '.join(record['inputs'])}), measured on a CPU with {features} (torch {record['torch_version']};
`python scripts/demo_precision_record.py`). `precision="auto"` runs the fastest one within
{AGREEMENT_YEARS} years on CPUs with the same features, else float32 (on the CPU measured: {chosen}); every
result says which ran.

| precision | ViT time over the inputs (vs fp32, {fp32:.1f} s) | largest age difference (years) | within {AGREEMENT_YEARS} y |
| --- | --- | --- | --- |
{rows}
"""


def write_card() -> None:
    metadata = read_metadata(MODEL)
    chosen = choose_precision(metadata, torch.device("cpu"))
    replace_section(CARD, SECTION, card_section(metadata[RECORD_KEY], "float32" if chosen == "fp32" else chosen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card-only", action="store_true",
                        help="only rewrite the model card's section from the record the checkpoint holds")
    if parser.parse_args().card_only:
        write_card()
        return
    before = read_metadata(MODEL)["weights_sha256"]
    record = measure_precisions(load_model(MODEL), log=lambda message: print(message, flush=True))
    if record["weights_sha256"] != before:
        raise SystemExit(f"measured other weights: {record['weights_sha256']} is not {before}")
    rewrite_card(MODEL, MODEL, {RECORD_KEY: record})
    if read_metadata(MODEL)["weights_sha256"] != before:
        raise SystemExit("the weights digest changed")
    write_card()
    print({name: round(years, 4) for name, years in record["max_age_difference_years"].items()})


if __name__ == "__main__":
    main()
