"""``cake-images``: the container images of the dev cluster, built here and loaded into it.

One list, ``k8s/images.yaml``, names every image the dev overlay runs with its Dockerfile,
build context, build arguments, target stage and the paths Tilt watches; the Tiltfile reads
the same file, so ``tilt up`` and this command build the same images.

- ``cake-images base`` makes ``debian:bookworm-slim``, the only image every Dockerfile starts
  from, when the engine does not have it: a Debian bookworm minbase root filesystem from
  ``mmdebstrap`` with this machine's extra CA certificates (so pip, uv, Maven and apt work
  behind a TLS-intercepting proxy inside the builds), imported with ``docker import``. The
  root filesystem tarball is cached under ``$XDG_CACHE_HOME/cake/images/`` and made once.
  On a machine that can pull images, ``docker pull debian:bookworm-slim`` does the same job.
- ``cake-images build [--tag TAG] [NAME...]``: ``base``, then ``docker build`` of each image
  (the legacy builder, ``DOCKER_BUILDKIT=0``: no BuildKit frontend to pull), one line per
  image with its time and size; the full log is in ``.run/images/NAME.log``.
- ``cake-images load [--tag TAG] [NAME...]``: ``docker save | ctr -n k8s.io images import -``
  for each image whose ID containerd's ``k8s.io`` namespace does not hold yet, so the
  kubelet (``imagePullPolicy: IfNotPresent``) finds it without a registry.
- ``cake-images list``: the images and how each is built.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cake_devtools.k8s_gateway import repository_root

#: Relative to the repository root.
IMAGES_FILE = Path("k8s/images.yaml")
#: Where the build logs go (git- and docker-ignored).
LOG_DIR = Path(".run/images")
#: The one external image the Dockerfiles start from.
BASE_IMAGE = "debian:bookworm-slim"
SUITE = "bookworm"
DEFAULT_DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
#: Extra CA certificates of this machine (update-ca-certificates reads ``*.crt`` there).
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
#: mmdebstrap's hook that lays out merged /usr itself instead of installing ``usrmerge`` (and
#: with it Perl, 45 MB): the same layout as Debian's own images.
MERGED_USR_HOOKS = Path("/usr/share/mmdebstrap/hooks/merged-usr")
#: What Debian's slim images leave out (debuerreotype's slimming), kept in the image's dpkg
#: configuration so that packages installed later leave it out too.
SLIM_DPKG_OPTIONS = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/groff/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/lintian/*",
    "path-exclude=/usr/share/linda/*",
    "path-exclude=/usr/share/locale/*",
)
APT_OPTIONS = ('Acquire::Languages "none"',)
#: The image config ``docker import`` cannot infer. PATH matters: a Dockerfile's
#: ``ENV PATH=/x:$PATH`` expands an unset PATH to nothing.
BASE_IMAGE_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    'CMD ["bash"]',
)
#: Bump to make every machine rebuild its cached root filesystem.
BASE_RECIPE_VERSION = 1
ROOTFS_PLACEHOLDER = Path("rootfs.tar")
CONTAINERD_NAMESPACE = "k8s.io"

_NAME = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


class ImagesError(RuntimeError):
    """An image list is wrong or a step failed; the message says what to do."""


@dataclass(frozen=True)
class ImageSpec:
    """One image of ``k8s/images.yaml``."""

    name: str
    tag: str
    dockerfile: str
    context: str
    build_args: Mapping[str, str] = field(default_factory=dict)
    target: str | None = None
    only: tuple[str, ...] = ()
    sync: tuple[str, ...] = ()

    def ref(self, tag: str | None = None) -> str:
        return f"{self.name}:{tag or self.tag}"


# -- the list ----------------------------------------------------------------------------------


def _strings(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ImagesError(f"{where}: expected a list of paths")
    return tuple(value)


def parse_images(data: object, source: str = str(IMAGES_FILE)) -> tuple[ImageSpec, ...]:
    """The images of a loaded ``images.yaml``; every mistake is an :class:`ImagesError`."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ImagesError(f"{source}: expected a mapping with a list `images`")
    allowed = {"name", "tag", "dockerfile", "context", "build_args", "target", "only", "sync"}
    images: list[ImageSpec] = []
    for index, entry in enumerate(data["images"]):
        where = f"{source}: images[{index}]"
        if not isinstance(entry, dict):
            raise ImagesError(f"{where}: expected a mapping")
        unknown = set(entry) - allowed
        if unknown:
            raise ImagesError(f"{where}: unknown keys {sorted(unknown)}")
        for key in ("name", "tag", "dockerfile", "context"):
            if not isinstance(entry.get(key), str | int | float) or entry[key] == "":
                raise ImagesError(f"{where}: `{key}` is required")
        name, tag = str(entry["name"]), str(entry["tag"])
        where = f"{source}: {name}"
        if not _NAME.fullmatch(name):
            raise ImagesError(f"{where}: not a valid image name")
        if not _TAG.fullmatch(tag):
            raise ImagesError(f"{where}: tag {tag!r} is not a valid tag")
        args = entry.get("build_args") or {}
        if not isinstance(args, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in args.items()
        ):
            raise ImagesError(f"{where}: build_args must map names to strings")
        target = entry.get("target")
        if target is not None and not isinstance(target, str):
            raise ImagesError(f"{where}: target must be a stage name")
        if "only" not in entry:
            raise ImagesError(f"{where}: `only` is required (what Tilt sends and watches)")
        images.append(
            ImageSpec(
                name=name,
                tag=tag,
                dockerfile=str(entry["dockerfile"]),
                context=str(entry["context"]),
                build_args=dict(args),
                target=target,
                only=_strings(entry["only"], f"{where}: only"),
                sync=_strings(entry.get("sync", []), f"{where}: sync"),
            )
        )
    names = [image.name for image in images]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ImagesError(f"{source}: listed twice: {', '.join(duplicates)}")
    return tuple(images)


def read_images(root: Path) -> tuple[ImageSpec, ...]:
    path = root / IMAGES_FILE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ImagesError(f"cannot read {path}: {error}") from error
    return parse_images(data, str(IMAGES_FILE))


def select(images: Sequence[ImageSpec], names: Sequence[str]) -> list[ImageSpec]:
    """The named images (``cake-auth`` or just ``auth``), in list order; all if none named."""
    if not names:
        return list(images)
    by_name = {image.name: image for image in images}
    wanted: set[str] = set()
    for name in names:
        bare = name.split(":", 1)[0]
        found = by_name.get(bare) or by_name.get(f"cake-{bare}")
        if found is None:
            raise ImagesError(f"unknown image {name!r}; known: {', '.join(by_name)}")
        wanted.add(found.name)
    return [image for image in images if image.name in wanted]


# -- commands ----------------------------------------------------------------------------------


def build_command(image: ImageSpec, tag: str | None = None) -> list[str]:
    """``docker build`` of one image, run from the repository root (paths are relative)."""
    command = ["docker", "build", "--file", image.dockerfile, "--tag", image.ref(tag)]
    for name, value in image.build_args.items():
        command += ["--build-arg", f"{name}={value}"]
    if image.target:
        command += ["--target", image.target]
    return [*command, image.context]


def build_environment(base: Mapping[str, str]) -> dict[str, str]:
    """The legacy builder: BuildKit would pull its frontend and can't here."""
    return {**base, "DOCKER_BUILDKIT": "0"}


def containerd_reference(ref: str) -> str:
    """The fully qualified name containerd (and so the kubelet) knows ``ref`` by."""
    name, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "latest")
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        qualified = name
    elif rest:
        qualified = f"docker.io/{name}"
    else:
        qualified = f"docker.io/library/{name}"
    return f"{qualified}:{tag}"


def cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    cache_home = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME", "~")) / ".cache")
    return Path(cache_home).expanduser() / "cake" / "images"


def apt_mirrors(paths: Iterable[Path] = APT_SOURCES) -> tuple[str, str]:
    """This machine's Debian and Debian security mirrors (apt's sources, both formats)."""
    debian, security = DEFAULT_DEBIAN_MIRROR, DEFAULT_SECURITY_MIRROR
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(path.glob("*.list")) + sorted(path.glob("*.sources"))
        elif path.is_file():
            files.append(path)
    found: list[tuple[str, list[str]]] = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except OSError:
            continue
        found += _sources_entries(text, deb822=file.suffix == ".sources")
    for uri, suites in reversed(found):
        if f"{SUITE}-security" in suites:
            security = uri
        elif SUITE in suites:
            debian = uri
    return debian.rstrip("/"), security.rstrip("/")


def _sources_entries(text: str, *, deb822: bool) -> list[tuple[str, list[str]]]:
    """``(uri, suites)`` of the binary-package entries of one apt sources file."""
    entries: list[tuple[str, list[str]]] = []
    if not deb822:
        for line in text.splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                entries.append((words[1], [words[2]]))
        return entries
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if (
            fields.get("enabled", "yes").lower() == "no"
            or "deb" not in fields.get("types", "").split()
        ):
            continue
        for uri in fields.get("uris", "").split():
            entries.append((uri, fields.get("suites", "").split()))
    return entries


def local_ca_certificates(directory: Path = LOCAL_CA_DIR) -> list[Path]:
    """The extra CA certificates update-ca-certificates would add here."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.rglob("*.crt") if p.is_file() and " " not in str(p))


def mmdebstrap_command(
    output: Path,
    *,
    mirrors: tuple[str, str],
    ca_files: Sequence[Path],
    merged_usr_hooks: Path | None = MERGED_USR_HOOKS,
) -> list[str]:
    """The root filesystem of ``debian:bookworm-slim``: minbase, CA certificates, apt usable."""
    debian, security = mirrors
    command = ["mmdebstrap", "--variant=minbase", "--include=ca-certificates"]
    if merged_usr_hooks is not None:
        command.append(f"--hook-dir={merged_usr_hooks}")
    command += [f"--dpkgopt={option}" for option in SLIM_DPKG_OPTIONS]
    command += [f"--aptopt={option}" for option in APT_OPTIONS]
    # Package scripts must not start services while an image is built (as in Debian's
    # images): mmdebstrap's own policy-rc.d would be removed at its cleanup, so keep ours.
    command.append("--skip=chroot/policy-rc.d")
    command.append(
        "--essential-hook="
        "printf '#!/bin/sh\\nexit 101\\n' > \"$1/usr/sbin/policy-rc.d\""
        ' && chmod 0755 "$1/usr/sbin/policy-rc.d"'
    )
    if ca_files:
        command.append('--customize-hook=mkdir -p "$1/usr/local/share/ca-certificates"')
        files = " ".join(str(f) for f in ca_files)
        command.append(f"--customize-hook=copy-in {files} /usr/local/share/ca-certificates/")
    command += [
        '--customize-hook=chroot "$1" update-ca-certificates --fresh',
        '--customize-hook=rm -f "$1"/var/cache/debconf/*-old "$1"/var/lib/dpkg/*-old',
        SUITE,
        str(output),
        f"deb {debian} {SUITE} main",
        f"deb {debian} {SUITE}-updates main",
        f"deb {security} {SUITE}-security main",
    ]
    return command


def rootfs_name(command: Sequence[str], ca_files: Sequence[Path]) -> str:
    """The cached tarball's name: changes with the recipe (``command``, made with the output
    :data:`ROOTFS_PLACEHOLDER`) and the certificates it adds."""
    digest = hashlib.sha256(f"{BASE_RECIPE_VERSION}\0".encode())
    for word in command:
        digest.update(word.encode() + b"\0")
    for ca in ca_files:
        digest.update(ca.read_bytes())
    return f"debian-{SUITE}-slim-{digest.hexdigest()[:12]}.tar"


def import_command(rootfs: Path, ref: str = BASE_IMAGE) -> list[str]:
    command = ["docker", "import"]
    for change in BASE_IMAGE_CHANGES:
        command += ["--change", change]
    return [
        *command,
        "--message",
        f"cake-images base: {rootfs.name}",
        str(rootfs),
        ref,
    ]


def save_command(ref: str) -> list[str]:
    return ["docker", "save", ref]


def ctr_import_command(namespace: str = CONTAINERD_NAMESPACE) -> list[str]:
    return ["ctr", "--namespace", namespace, "images", "import", "-"]


# -- running -----------------------------------------------------------------------------------

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def _run(command: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), text=True, check=False, **kwargs)


def _require(binary: str, hint: str) -> None:
    if shutil.which(binary) is None:
        raise ImagesError(f"{binary} not found: {hint}")


def docker_image_id(ref: str) -> str | None:
    result = _run(["docker", "image", "inspect", "--format", "{{.Id}}", ref], capture_output=True)
    return result.stdout.strip() if result.returncode == 0 else None


def docker_image_size(ref: str) -> int:
    result = _run(["docker", "image", "inspect", "--format", "{{.Size}}", ref], capture_output=True)
    return int(result.stdout.strip()) if result.returncode == 0 else 0


def human_size(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def ensure_base(*, force: bool = False, echo: Callable[[str], None] = print) -> None:
    """``debian:bookworm-slim`` in the engine: imported from a cached mmdebstrap rootfs."""
    _require("docker", "install Docker (the engine must run)")
    if not force and docker_image_id(BASE_IMAGE) is not None:
        echo(f"{BASE_IMAGE:<22} present")
        return
    ca_files = local_ca_certificates()
    hooks = MERGED_USR_HOOKS if MERGED_USR_HOOKS.is_dir() else None
    cache = cache_dir()
    mirrors = apt_mirrors()
    recipe = mmdebstrap_command(
        ROOTFS_PLACEHOLDER, mirrors=mirrors, ca_files=ca_files, merged_usr_hooks=hooks
    )
    rootfs = cache / rootfs_name(recipe, ca_files)
    started = time.monotonic()
    if force or not rootfs.is_file():
        _require(
            "mmdebstrap",
            f"apt-get install mmdebstrap (or, where a registry is reachable, "
            f"docker pull {BASE_IMAGE})",
        )
        cache.mkdir(parents=True, exist_ok=True)
        partial = rootfs.with_suffix(".partial.tar")
        command = mmdebstrap_command(
            partial, mirrors=mirrors, ca_files=ca_files, merged_usr_hooks=hooks
        )
        echo(f"{BASE_IMAGE:<22} mmdebstrap {SUITE} minbase -> {rootfs} (about 90 s)")
        log = cache / "mmdebstrap.log"
        with log.open("w", encoding="utf-8") as out:
            result = _run(command, stdout=out, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            raise ImagesError(f"mmdebstrap failed (exit {result.returncode}), see {log}")
        partial.replace(rootfs)
        for stale in cache.glob(f"debian-{SUITE}-slim-*.tar"):
            if stale != rootfs:
                stale.unlink(missing_ok=True)
    result = _run(import_command(rootfs), capture_output=True)
    if result.returncode != 0:
        raise ImagesError(f"docker import {rootfs} failed:\n{result.stderr.strip()}")
    size = human_size(docker_image_size(BASE_IMAGE))
    echo(f"{BASE_IMAGE:<22} imported in {time.monotonic() - started:6.1f}s  {size:>9}")


def _context_size(log: str) -> str | None:
    match = re.search(r"Sending build context to Docker daemon\s+(\S+\s?\S*B)", log)
    return match[1].replace(" ", "") if match else None


def build_image(
    root: Path, image: ImageSpec, tag: str | None, echo: Callable[[str], None] = print
) -> None:
    ref = image.ref(tag)
    log_path = root / LOG_DIR / f"{image.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log_path.open("w", encoding="utf-8") as log:
        result = _run(
            build_command(image, tag),
            cwd=root,
            env=build_environment(os.environ),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    elapsed = time.monotonic() - started
    text = log_path.read_text(encoding="utf-8", errors="replace")
    if result.returncode != 0:
        tail = "\n".join(text.splitlines()[-25:])
        raise ImagesError(f"{ref}: docker build failed (full log: {log_path}):\n{tail}")
    size = human_size(docker_image_size(ref))
    context = _context_size(text)
    detail = f"  (context {context})" if context else ""
    echo(f"{ref:<22} built in {elapsed:6.1f}s  {size:>9}{detail}")


def containerd_config_digest(ref: str, namespace: str = CONTAINERD_NAMESPACE) -> str | None:
    """The config digest (= Docker's image ID) of ``ref`` in containerd, if it has it."""
    qualified = containerd_reference(ref)
    listed = _run(
        ["ctr", "--namespace", namespace, "images", "ls", f"name=={qualified}"],
        capture_output=True,
    )
    if listed.returncode != 0:
        raise ImagesError(f"ctr images ls failed:\n{listed.stderr.strip()}")
    digest = _listed_digest(listed.stdout, qualified)
    seen: set[str] = set()
    while digest and digest not in seen:
        seen.add(digest)
        content = _run(
            ["ctr", "--namespace", namespace, "content", "get", digest], capture_output=True
        )
        if content.returncode != 0:
            return None
        document = json.loads(content.stdout)
        config = document.get("config")
        if isinstance(config, dict):
            return str(config.get("digest"))
        manifests = document.get("manifests") or []
        digest = str(manifests[0]["digest"]) if manifests else None
    return None


def _listed_digest(listing: str, qualified: str) -> str | None:
    for line in listing.splitlines()[1:]:
        words = line.split()
        if len(words) >= 3 and words[0] == qualified:
            return words[2]
    return None


def load_image(image: ImageSpec, tag: str | None, echo: Callable[[str], None] = print) -> None:
    ref = image.ref(tag)
    image_id = docker_image_id(ref)
    if image_id is None:
        raise ImagesError(f"{ref} is not built: run `cake-images build {image.name}` first")
    if containerd_config_digest(ref) == image_id:
        echo(f"{ref:<22} already in containerd ({image_id[7:19]})")
        return
    started = time.monotonic()
    with tempfile.TemporaryFile() as errors:
        save = subprocess.Popen(save_command(ref), stdout=subprocess.PIPE, stderr=errors)
        assert save.stdout is not None
        loaded = subprocess.run(
            ctr_import_command(), stdin=save.stdout, capture_output=True, check=False
        )
        save.stdout.close()
        saved = save.wait()
        errors.seek(0)
        save_errors = errors.read().decode(errors="replace").strip()
    if saved != 0:
        raise ImagesError(f"docker save {ref} failed:\n{save_errors}")
    if loaded.returncode != 0:
        message = loaded.stderr.decode(errors="replace").strip()
        raise ImagesError(f"ctr images import of {ref} failed:\n{message}")
    if containerd_config_digest(ref) != image_id:
        raise ImagesError(f"{ref}: imported, but containerd does not list it with {image_id}")
    echo(f"{ref:<22} loaded in {time.monotonic() - started:6.1f}s  ({image_id[7:19]})")


# -- command line ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cake-images",
        description="Build the dev cluster's images (k8s/images.yaml) and load them into it.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    base = commands.add_parser("base", help=f"make {BASE_IMAGE} if the engine lacks it")
    base.add_argument(
        "--force", action="store_true", help="make the root filesystem again and re-import it"
    )
    for name, text in (
        ("build", "docker build the images (after base)"),
        ("load", "import the built images into containerd's k8s.io namespace"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument(
            "--tag",
            help="tag of every selected image (default: its tag in k8s/images.yaml)",
        )
        sub.add_argument("names", nargs="*", metavar="NAME", help="images (default: all)")
    commands.add_parser("list", help="the images and how each is built")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        root = repository_root()
        images = read_images(root)
        if args.command == "list":
            for image in images:
                print(" ".join(build_command(image)))
        elif args.command == "base":
            ensure_base(force=args.force)
        elif args.command == "build":
            if args.tag is not None and not _TAG.fullmatch(args.tag):
                raise ImagesError(f"--tag {args.tag!r} is not a valid tag")
            chosen = select(images, args.names)
            ensure_base()
            started = time.monotonic()
            for image in chosen:
                build_image(root, image, args.tag)
            print(f"{len(chosen)} image(s) built in {time.monotonic() - started:.1f}s")
        else:
            chosen = select(images, args.names)
            _require("ctr", "containerd's client; the cluster's containerd must run")
            _require("docker", "install Docker (the engine must run)")
            for image in chosen:
                load_image(image, args.tag)
    except ImagesError as error:
        print(f"cake-images: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
