"""`meshserve deploy k8s`: the Kubernetes manifests, from services/supervisor/topology.py.

    meshserve deploy k8s [--out DIR]          write the kustomize tree (default deploy/k8s)
    meshserve deploy k8s --check [--out DIR]  exit 1 when DIR differs from what it would write
    meshserve deploy k8s --overlay cpu|gpu [--component model-pvc]
                                              print the rendered manifests, for
                                              `| kubectl apply -f -` without kustomize

The collector's config comes from otel/collector.yaml beside the tree (``--otel``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.supervisor.kustomize import (
    COMPONENTS,
    OVERLAYS,
    KustomizeError,
    apply_order,
    build,
    dump,
    tree,
)

DEFAULT_OUT = "deploy/k8s"
DEFAULT_OTEL = "otel/collector.yaml"


class DeployError(Exception):
    pass


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    deploy = commands.add_parser("deploy", help="write the mesh's deployment manifests")
    targets = deploy.add_subparsers(dest="deploy_target", required=True, metavar="TARGET")
    k8s = targets.add_parser("k8s", help="Kubernetes: a kustomize base and cpu/gpu overlays")
    k8s.add_argument("--out", default=DEFAULT_OUT, help=f"tree to write (default {DEFAULT_OUT})")
    k8s.add_argument("--otel", default=DEFAULT_OTEL,
                     help=f"the collector's config (default {DEFAULT_OTEL})")
    mode = k8s.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="compare the tree in --out with what would be written")
    mode.add_argument("--overlay", choices=OVERLAYS,
                      help="print this overlay rendered (as `kubectl kustomize` would)")
    k8s.add_argument("--component", action="append", default=[], choices=COMPONENTS,
                     help="with --overlay: add a component (model-pvc: the model from a PVC)")


def stale_files(out: Path, files: dict[str, str]) -> list[str]:
    """Paths under ``out`` that differ from ``files`` or are missing, and generated
    files (``*.yaml``) there that ``files`` no longer has."""
    stale = [p for p, text in files.items()
             if not (out / p).is_file() or (out / p).read_text() != text]
    extra = [str(p.relative_to(out)) for p in out.rglob("*.yaml")
             if str(p.relative_to(out)) not in files]
    return sorted(stale + extra)


def main(args: argparse.Namespace) -> int:
    try:
        files = tree(Path(args.otel).read_text())
    except OSError as e:
        raise DeployError(f"cannot read the collector config: {e} (pass --otel FILE)") from e
    out = Path(args.out)
    if args.overlay:
        components = tuple(f"components/{c}" for c in args.component)
        try:
            objects = build(files, f"overlays/{args.overlay}", components)
        except KustomizeError as e:
            raise DeployError(str(e)) from e
        sys.stdout.write(dump(apply_order(objects)))
        return 0
    if args.component:
        raise DeployError("--component goes with --overlay")
    if args.check:
        stale = stale_files(out, files)
        if stale:
            print(f"{out} is out of date ({', '.join(stale)}): run `meshserve deploy k8s "
                  f"--out {out}`", file=sys.stderr)
            return 1
        print(f"{out} is up to date")
        return 0
    for path, text in files.items():
        target = out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    print(f"wrote {len(files)} files to {out}")
    return 0
