"""Put trained toy-world weights into the package (``compose/toyworld/weights``) with a manifest.

    weights/model/          the base model's diffusers folder (export-toyworld)
    weights/loras/NAME.safetensors   the concept LoRAs (train-toyworld-loras)
    weights/loras/NAME-tara.safetensors  the object concepts trained with train-tara (TARA's rows)
    weights/gates.safetensors        AutoLoRA gates trained on the four LoRAs (optional)
    weights/manifest.json   sha256 and size of every file, and how the weights were trained

    python -m loracompose.toyworld.shipping MODEL_DIR LORA_DIR [--gates FILE] --note "how they were trained"

The embedded default copies the folder under ``$LORACOMPOSE_HOME`` into a folder named after the
manifest's digest, so shipping new weights never reuses a stale copy.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Mapping

from loracompose.errors import UserError
from loracompose.outputs import atomic_write_text, file_sha256, staged_directory
from loracompose.provenance import machine_specific_strings

MANIFEST = "manifest.json"
TARA_SUFFIX = "-tara"  # loras/NAME-tara.safetensors: NAME trained with train-tara


def weight_files(root: Path) -> dict[str, dict[str, Any]]:
    """``relative path -> {sha256, bytes}`` of every file under ``root`` but the manifest."""
    return {path.relative_to(root).as_posix(): {"sha256": file_sha256(path), "bytes": path.stat().st_size}
            for path in sorted(root.rglob("*")) if path.is_file() and path.name != MANIFEST}


def manifest_digest(root: Path) -> str:
    """Short digest of the manifest: names the embedded copy of these exact weights."""
    return hashlib.sha256((root / MANIFEST).read_bytes()).hexdigest()[:12]


def ship_weights(model_dir: Path, lora_dir: Path, dest: Path, provenance: Mapping[str, Any],
                 gates: Path | None = None) -> Path:
    """Copy the model, the concept LoRAs (and gates) into ``dest`` and write its manifest."""
    from .concepts import CONCEPTS

    with staged_directory(dest, replace=True) as staging:
        shutil.copytree(model_dir, staging / "model")
        (staging / "loras").mkdir()
        for name in CONCEPTS:
            shutil.copy2(Path(lora_dir) / f"{name}.safetensors", staging / "loras" / f"{name}.safetensors")
            tara = Path(lora_dir) / f"{name}{TARA_SUFFIX}.safetensors"
            if tara.is_file():  # the concept's TARA-trained LoRA (train-tara), for TARA's benchmark rows
                shutil.copy2(tara, staging / "loras" / tara.name)
        if gates is not None:
            shutil.copy2(gates, staging / "gates.safetensors")
        check_shippable(staging)
        write_manifest(staging, provenance)
    return dest


def write_manifest(root: Path, provenance: Mapping[str, Any]) -> Path:
    """(Re)write ``root``'s manifest: the digest of every file there and how they were trained."""
    manifest = {"files": weight_files(root), "provenance": dict(provenance)}
    return atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def check_shippable(root: Path) -> None:
    """Refuse weights whose safetensors metadata names the build machine's paths or training images."""
    from safetensors import safe_open

    for path in sorted(root.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            found = machine_specific_strings(handle.metadata() or {})
        if found:
            raise UserError(f"{path.name}: its metadata names {found[0]!r} (a machine path or image name); "
                            "retrain it with this version's trainer, which records names and digests instead")


def main(argv: list[str] | None = None) -> int:
    import argparse

    from loracompose.assets.embedded import PACKAGED_TOYWORLD

    parser = argparse.ArgumentParser(prog="python -m loracompose.toyworld.shipping",
                                     description="copy trained toy-world weights into the package")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("lora_dir", type=Path)
    parser.add_argument("--gates", type=Path)
    parser.add_argument("--note", default="", help="how and where the weights were trained (kept in the manifest)")
    parser.add_argument("--dest", type=Path, default=PACKAGED_TOYWORLD)
    args = parser.parse_args(argv)
    print(ship_weights(args.model_dir, args.lora_dir, args.dest, {"note": args.note}, gates=args.gates))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
