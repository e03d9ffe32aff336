"""Check Kubernetes manifests against the API types of KServe's own SDK and the Kubernetes client:
every field known to its type (no misspelt or misplaced key), every value of its type, every
required field present. Those SDKs are generated from the OpenAPI schemas the CRDs are built from.

Usage: .venv-kserve/bin/python -m marketplace_classifier.ops.kserve_schema deploy/kserve/*.yaml
Prints one line per problem and exits 1, or names what was checked and exits 0. Documents of kinds
it has no type for (e.g. Kustomization) are named as skipped.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import yaml

TYPES = {  # apiVersion group, kind -> the SDK class
    ("serving.kserve.io", "InferenceService"): "V1beta1InferenceService",
    ("serving.kserve.io", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
    ("networking.k8s.io", "NetworkPolicy"): "V1NetworkPolicy",
}
# Kubernetes' Quantity and IntOrString are strings in the SDKs but numbers in YAML
NUMBER_AS_STRING = (int, float)


def sdk_class(name: str):
    import kserve.models
    import kubernetes.client.models

    for module in (kserve.models, kubernetes.client.models):
        if hasattr(module, name):
            return getattr(module, name)
    raise LookupError(f"no SDK type {name}")


def problems(value, type_name: str, where: str) -> list[str]:
    """What is wrong with `value` as an instance of the SDK type `type_name`."""
    listed = re.fullmatch(r"[Ll]ist\[(.+)\]", type_name)
    mapped = re.fullmatch(r"dict\((\w+), (.+)\)|Dict\[(\w+), (.+)\]", type_name)
    if listed:
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {type(value).__name__}"]
        return [p for index, item in enumerate(value) for p in problems(item, listed[1], f"{where}[{index}]")]
    if mapped:
        if not isinstance(value, dict):
            return [f"{where}: expected a map, got {type(value).__name__}"]
        item_type = mapped[2] or mapped[4]
        return [p for key, item in value.items() for p in problems(item, item_type, f"{where}.{key}")]
    if type_name == "object":
        return []
    if type_name in ("str", "int", "bool", "float", "datetime"):
        return scalar_problems(value, type_name, where)
    return object_problems(value, sdk_class(type_name), where)


def scalar_problems(value, type_name: str, where: str) -> list[str]:
    expected = {"str": (str, *NUMBER_AS_STRING), "int": (int,), "bool": (bool,), "float": (int, float),
                "datetime": (str,)}[type_name]
    wrong_bool = isinstance(value, bool) and type_name != "bool"
    if wrong_bool or not isinstance(value, expected):
        return [f"{where}: expected {type_name}, got {type(value).__name__} {value!r}"]
    return []


def object_problems(value, cls, where: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where}: expected a {cls.__name__} object, got {type(value).__name__}"]
    python_name = {json: python for python, json in cls.attribute_map.items()}
    unknown = [key for key in value if key not in python_name]
    found = [f"{where}.{key}: not a field of {cls.__name__}" for key in unknown]
    for key, item in value.items():
        if key in python_name:
            found += problems(item, cls.openapi_types[python_name[key]], f"{where}.{key}")
    return found + sdk_problems(value, cls, python_name, where)


def sdk_problems(value: dict, cls, python_name: dict, where: str) -> list[str]:
    """The SDK's own check of required fields and allowed values: Kubernetes' models are pydantic
    (validated from the manifest's own keys), KServe's check in their constructors."""
    import pydantic

    try:
        if isinstance(cls, type) and issubclass(cls, pydantic.BaseModel):
            cls.from_dict(value)
        else:
            cls(**{python_name[key]: item for key, item in value.items() if key in python_name})
    except pydantic.ValidationError as error:
        return [f"{where}: {cls.__name__}: {problem['loc'][0] if problem['loc'] else ''} {problem['msg']}"
                for problem in error.errors()]
    except ValueError as error:
        return [f"{where}: {error}"]
    return []


def check_file(path: Path) -> tuple[list[str], list[str]]:
    """(problems, what was checked or skipped) of every document in `path`."""
    found, seen = [], []
    for index, document in enumerate(yaml.safe_load_all(path.read_text())):
        if document is None:
            continue
        group = str(document.get("apiVersion", "")).split("/")[0]
        type_name = TYPES.get((group, document.get("kind")))
        label = f"{path}#{index} {document.get('kind')}"
        if type_name is None:
            seen.append(f"{label}: skipped (no SDK type)")
            continue
        found += problems(document, type_name, label)
        seen.append(f"{label}: checked as {type_name}")
    return found, seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    found, seen = [], []
    for path in args.files:
        try:
            file_problems, file_seen = check_file(path)
        except (OSError, yaml.YAMLError) as error:
            file_problems, file_seen = [f"{path}: {error}"], []
        found += file_problems
        seen += file_seen
    for line in found or seen:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
