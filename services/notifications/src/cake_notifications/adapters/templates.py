"""Messages rendered with Jinja2 from ``cake_notifications/templates/<language>/<KIND>.j2``.

Each template holds one block per variant and part: ``<variant>_subject`` and
``<variant>_body`` for ``inbox``, ``email``, ``sms`` and ``push`` (a missing subject block
renders as empty). Text only (no HTML), so nothing is escaped; the environment is strict: a
variable a template uses but the event does not carry is an error, not a blank.
"""

from __future__ import annotations

from collections.abc import Mapping

import jinja2

from cake_notifications.domain.notifications import Kind, Language
from cake_notifications.service.ports import RenderedMessage


class JinjaRenderer:
    def __init__(self, loader: jinja2.BaseLoader | None = None) -> None:
        self._environment = jinja2.Environment(
            loader=loader or jinja2.PackageLoader("cake_notifications", "templates"),
            autoescape=False,  # noqa: S701 - plain-text messages, never HTML
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=False,
            trim_blocks=True,
        )

    def render(
        self, kind: Kind, language: Language, variant: str, values: Mapping[str, str]
    ) -> RenderedMessage:
        template = self._environment.get_template(f"{language.value}/{kind.value}.j2")
        context = template.new_context(dict(values))
        return RenderedMessage(
            subject=self._block(template, f"{variant}_subject", context).strip(),
            body=self._block(template, f"{variant}_body", context).strip(),
        )

    def check(self, samples: Mapping[Kind, Mapping[str, str]]) -> None:
        """Render every kind, language and variant once (start-up: a broken template fails
        the process, not the first event)."""
        for kind, values in samples.items():
            for language in Language:
                for variant in ("inbox", "email", "sms", "push"):
                    self.render(kind, language, variant, values)

    @staticmethod
    def _block(template: jinja2.Template, name: str, context: jinja2.runtime.Context) -> str:
        block = template.blocks.get(name)
        if block is None:
            return ""
        return "".join(block(context))
