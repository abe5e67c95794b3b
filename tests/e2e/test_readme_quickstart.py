"""The README's quickstart, run as pasted (the block between its quickstart markers) against
the test stack: a newcomer's first session must work, so this test keeps it from rotting."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from cake_devtools.stack import Stack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parents[2]


def quickstart() -> str:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- quickstart:begin -->", 1)[1].split("<!-- quickstart:end -->", 1)[0]
    (script,) = re.findall(r"```bash\n(.*?)```", block, flags=re.DOTALL)
    return script


def test_the_quickstart_runs_as_pasted(full_stack: Stack) -> None:
    environment = {
        **os.environ,
        # The auth CLI of step 1 acts on the test stack's database (these win over the dev
        # stack's env file), and the gateway is the test stack's.
        **full_stack.service_environment()["auth"],
        "G": full_stack.gateway_url,
    }
    ran = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", quickstart()],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert ran.returncode == 0, f"{ran.stdout}\n{ran.stderr}"
    lines = ran.stdout.splitlines()
    assert re.fullmatch(
        r"created admin user 'boss_\d+' \(id \d+, email boss_\d+@example.com\)", lines[0]
    )
    assert re.fullmatch(r"campaign: \d+", lines[1])
    assert lines[2] == "register: 201"
    assert re.fullmatch(r"voucher: CAKE-[A-Z0-9]{8}", lines[3]), lines[3]
    code = lines[3].removeprefix("voucher: ")

    first = json.loads(lines[4])
    assert first["success"] is True
    assert (first["originalAmount"], first["discountAmount"], first["finalAmount"]) == (
        100000,
        20000,
        80000,
    )
    assert first["voucherCode"] == code
    # The retry with the same key: marked as a replay, the very same answer.
    assert lines[5] == "replayed: true"
    assert json.loads(lines[6]) == first

    stats = json.loads(lines[7])
    assert isinstance(stats, dict) and stats
    assert lines[8] == "campaign ended: 200"
    assert len(lines) == 9, ran.stdout
