"""The toy world: procedural scenes with exact ground truth, a detector, and a small diffusers model.

    scenes.py    scene_from_seed / render / caption: deterministic scenes and their captions
    detector.py  detect(image) -> objects (shape, colour, position) and background; measure_accuracy
    model.py     the diffusers parts (UNet, CLIP text encoder, fold VAE) loaded by load_pipeline as SD1.5
    train.py     train_toyworld(settings): resumable, seeded training of the base model; export_model
    evaluate.py  detector-judged sample rates of a trained model (colour/shape right, both objects present)
"""

from .detector import Detection, DetectedObject, detect, measure_accuracy
from .scenes import Scene, SceneObject, make_scene, render, scene_from_seed

__all__ = ["Detection", "DetectedObject", "Scene", "SceneObject", "detect", "make_scene", "measure_accuracy",
           "render", "scene_from_seed"]
