"""cake-images without an engine: the image list, and the commands it would run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cake_devtools import images
from cake_devtools.images import ImagesError, ImageSpec
from cake_devtools.k8s_gateway import repository_root

ROOT = repository_root()
ALL = (
    "cake-auth",
    "cake-promotions",
    "cake-events",
    "cake-payments",
    "cake-notifications",
    "cake-gateway",
    "cake-postgres",
    "cake-redis",
    "cake-kafka",
)


def entry(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "cake-x",
        "tag": "dev",
        "dockerfile": "x/Dockerfile",
        "context": ".",
        "only": ["x"],
    }
    return {**base, **overrides}


def test_the_repositorys_list_holds_every_image_the_dev_cluster_runs() -> None:
    listed = images.read_images(ROOT)
    assert tuple(i.name for i in listed) == ALL
    tags = {i.name: i.tag for i in listed}
    assert {tags[n] for n in ALL[:4]} == {"dev"}
    assert (tags["cake-postgres"], tags["cake-redis"], tags["cake-kafka"]) == ("15", "7", "4.4.0")
    for image in listed:
        assert (ROOT / image.dockerfile).is_file(), image.name
        assert (ROOT / image.context).is_dir(), image.name
        assert image.only, image.name


def test_services_build_their_live_update_stage_with_their_service_argument() -> None:
    by_name = {i.name: i for i in images.read_images(ROOT)}
    for service in ("auth", "promotions", "events"):
        image = by_name[f"cake-{service}"]
        assert image.build_args == {"SERVICE": service}
        assert image.target == "live-update"
        assert f"services/{service}/src/cake_{service}" in image.sync
    assert not by_name["cake-gateway"].sync and by_name["cake-gateway"].target is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "Cake_X"}, "not a valid image name"),
        ({"tag": "a b"}, "not a valid tag"),
        ({"only": "x"}, "expected a list of paths"),
        ({"only": []}, "at least one path"),
        ({"build_args": {"A": 1}}, "build_args"),
        ({"targte": "x"}, "unknown keys"),
        ({"dockerfile": ""}, "`dockerfile` is required"),
    ],
)
def test_a_wrong_entry_is_refused_with_the_reason(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ImagesError, match=message):
        images.parse_images({"images": [entry(**change)]})


def test_only_is_required_and_names_are_unique() -> None:
    missing = entry()
    del missing["only"]
    with pytest.raises(ImagesError, match="`only` is required"):
        images.parse_images({"images": [missing]})
    with pytest.raises(ImagesError, match="listed twice: cake-x"):
        images.parse_images({"images": [entry(), entry()]})
    with pytest.raises(ImagesError, match="list `images`"):
        images.parse_images({"image": []})


def test_numeric_tags_read_as_strings() -> None:
    (image,) = images.parse_images({"images": [entry(tag=15)]})
    assert image.ref() == "cake-x:15"
    assert image.ref("dev") == "cake-x:dev"


def test_select_by_full_or_short_name_keeps_the_list_order() -> None:
    listed = images.read_images(ROOT)
    chosen = images.select(listed, ["kafka", "cake-auth", "gateway:dev"])
    assert [i.name for i in chosen] == ["cake-auth", "cake-gateway", "cake-kafka"]
    assert images.select(listed, []) == list(listed)
    with pytest.raises(ImagesError, match="unknown image 'nginx'"):
        images.select(listed, ["nginx"])


def test_build_command_names_dockerfile_tag_arguments_target_and_context() -> None:
    image = ImageSpec(
        name="cake-auth",
        tag="dev",
        dockerfile="services/Dockerfile",
        context=".",
        build_args={"SERVICE": "auth"},
        target="live-update",
        only=("uv.lock",),
    )
    assert images.build_command(image, "v2") == [
        "docker",
        "build",
        "--file",
        "services/Dockerfile",
        "--tag",
        "cake-auth:v2",
        "--build-arg",
        "SERVICE=auth",
        "--target",
        "live-update",
        ".",
    ]
    plain = ImageSpec("cake-redis", "7", "images/redis/Dockerfile", "images/redis")
    assert images.build_command(plain)[-3:] == ["--tag", "cake-redis:7", "images/redis"]
    assert images.build_environment({"PATH": "/bin", "DOCKER_BUILDKIT": "1"}) == {
        "PATH": "/bin",
        "DOCKER_BUILDKIT": "0",
    }


@pytest.mark.parametrize(
    ("ref", "qualified"),
    [
        ("cake-auth:dev", "docker.io/library/cake-auth:dev"),
        ("cake-auth", "docker.io/library/cake-auth:latest"),
        ("team/app:1", "docker.io/team/app:1"),
        ("registry.k8s.io/pause:3.10", "registry.k8s.io/pause:3.10"),
        ("localhost:5000/app:1", "localhost:5000/app:1"),
        ("localhost:5000/app", "localhost:5000/app:latest"),
    ],
)
def test_containerd_knows_images_by_their_fully_qualified_names(ref: str, qualified: str) -> None:
    assert images.containerd_reference(ref) == qualified


def test_load_pipes_docker_save_into_containerds_kubernetes_namespace() -> None:
    assert images.save_command("cake-auth:dev") == ["docker", "save", "cake-auth:dev"]
    assert images.ctr_import_command() == [
        "ctr",
        "--namespace",
        "k8s.io",
        "images",
        "import",
        "-",
    ]
    listing = (
        "REF TYPE DIGEST SIZE PLATFORMS LABELS\n"
        "docker.io/library/cake-auth:dev application/vnd.docker.distribution.manifest.v2+json "
        "sha256:abc 80.1 MiB linux/amd64 -\n"
    )
    assert images._listed_digest(listing, "docker.io/library/cake-auth:dev") == "sha256:abc"
    assert images._listed_digest(listing, "docker.io/library/cake-events:dev") is None


def test_the_rootfs_cache_follows_xdg() -> None:
    assert images.cache_dir({"XDG_CACHE_HOME": "/c", "HOME": "/h"}) == Path("/c/cake/images")
    assert images.cache_dir({"HOME": "/h"}) == Path("/h/.cache/cake/images")


def test_apt_mirrors_come_from_this_machines_sources(tmp_path: Path) -> None:
    listed = tmp_path / "sources.list.d"
    listed.mkdir()
    (listed / "debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://disabled.example/debian\nSuites: bookworm\nEnabled: no\n"
    )
    (listed / "other.list").write_text("deb [arch=amd64] https://other.example/apt stable main\n")
    assert images.apt_mirrors([tmp_path / "missing.list", listed]) == (
        "http://mirror.example/debian",
        "http://mirror.example/debian-security",
    )
    one_line = tmp_path / "sources.list"
    one_line.write_text(
        "deb http://one.example/debian bookworm main # comment\n"
        "deb-src http://src.example/debian bookworm main\n"
    )
    assert images.apt_mirrors([one_line]) == (
        "http://one.example/debian",
        images.DEFAULT_SECURITY_MIRROR,
    )
    assert images.apt_mirrors([]) == (
        images.DEFAULT_DEBIAN_MIRROR,
        images.DEFAULT_SECURITY_MIRROR,
    )


def test_the_base_rootfs_is_minbase_with_this_machines_cas_and_usable_apt(tmp_path: Path) -> None:
    ca = tmp_path / "proxy.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    command = images.mmdebstrap_command(
        tmp_path / "out.tar", mirrors=("http://m/debian", "http://m/security"), ca_files=[ca]
    )
    assert command[:3] == ["mmdebstrap", "--variant=minbase", "--include=ca-certificates"]
    assert command[-5:] == [
        "bookworm",
        str(tmp_path / "out.tar"),
        "deb http://m/debian bookworm main",
        "deb http://m/debian bookworm-updates main",
        "deb http://m/security bookworm-security main",
    ]
    hooks = [c.split("=", 1)[1] for c in command if c.startswith("--customize-hook=")]
    copy = hooks.index(f"copy-in {ca} /usr/local/share/ca-certificates/")
    assert hooks.index('chroot "$1" update-ca-certificates') > copy
    assert any("policy-rc.d" in hook for hook in hooks)
    assert any('Dir::Cache::pkgcache ""' in hook for hook in hooks)
    assert "--dpkgopt=path-exclude=/usr/share/doc/*" in command
    without = images.mmdebstrap_command(
        tmp_path / "out.tar", mirrors=("a", "b"), ca_files=[], merged_usr_hooks=None
    )
    assert not any("copy-in" in c or c.startswith("--hook-dir") for c in without)


def test_the_cached_rootfs_changes_with_the_recipe_and_the_certificates(tmp_path: Path) -> None:
    ca = tmp_path / "proxy.crt"
    ca.write_text("one")
    recipe = images.mmdebstrap_command(images.ROOTFS_PLACEHOLDER, mirrors=("a", "b"), ca_files=[ca])
    first = images.rootfs_name(recipe, [ca])
    assert first == images.rootfs_name(recipe, [ca])
    assert first.startswith("debian-bookworm-slim-") and first.endswith(".tar")
    other_mirror = images.mmdebstrap_command(
        images.ROOTFS_PLACEHOLDER, mirrors=("c", "b"), ca_files=[ca]
    )
    assert images.rootfs_name(other_mirror, [ca]) != first
    ca.write_text("two")
    assert images.rootfs_name(recipe, [ca]) != first


def test_the_imported_base_image_has_a_path(tmp_path: Path) -> None:
    command = images.import_command(tmp_path / "rootfs.tar")
    assert command[:2] == ["docker", "import"]
    assert command[-2:] == [str(tmp_path / "rootfs.tar"), "debian:bookworm-slim"]
    changes = [command[i + 1] for i, word in enumerate(command) if word == "--change"]
    assert any(c.startswith("ENV PATH=/usr/local/sbin:") for c in changes)


def test_local_ca_certificates_are_the_crt_files(tmp_path: Path) -> None:
    (tmp_path / "a.crt").write_text("a")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.crt").write_text("b")
    (tmp_path / "README").write_text("not a certificate")
    assert images.local_ca_certificates(tmp_path) == [tmp_path / "a.crt", tmp_path / "sub/b.crt"]
    assert images.local_ca_certificates(tmp_path / "missing") == []


def test_sizes_and_context_read_like_dockers() -> None:
    assert images.human_size(512) == "512 B"
    assert images.human_size(81_500_000) == "81.5 MB"
    assert images.human_size(2_300_000_000) == "2.3 GB"
    log = "Sending build context to Docker daemon  2.708MB\r\r\nStep 1/20 : FROM x\n"
    assert images._context_size(log) == "2.708MB"


def test_cli_lists_the_build_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert images.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(ALL)
    assert lines[0].startswith("docker build --file services/Dockerfile --tag cake-auth:dev")


def test_cli_refuses_an_unknown_image_or_tag(capsys: pytest.CaptureFixture[str]) -> None:
    assert images.main(["build", "nginx"]) == 1
    assert "unknown image 'nginx'" in capsys.readouterr().err
    assert images.main(["build", "--tag", "a b", "auth"]) == 1
    assert "not a valid tag" in capsys.readouterr().err
