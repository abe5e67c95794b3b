from __future__ import annotations

import uuid
from email import message_from_bytes
from email.policy import default

from cake_notifications.adapters.channels import email_message
from cake_notifications.domain.notifications import Channel
from cake_notifications.service.ports import OutgoingMessage


def test_an_email_reads_back_as_written_vietnamese_subject_and_body_included() -> None:
    subject = "Mã giảm giá Cake CAKE-ABCDEFGH: giảm 30.00% cho lần nạp tiền tiếp theo của bạn"
    body = "Xin chào Nguyễn Văn An,\n\nHãy nhập mã khi nạp tiền.\n\nĐội ngũ Cake"
    delivery_id = uuid.uuid4()
    raw = email_message(
        OutgoingMessage(delivery_id, Channel.EMAIL, "an@example.com", subject, body),
        "Cake <no-reply@cake.local>",
    )
    assert raw.isascii() and b"\r\n" in raw and b"\n\n" not in raw.replace(b"\r\n", b"")
    parsed = message_from_bytes(raw, policy=default)
    assert parsed["Subject"] == subject
    assert parsed["From"] == "Cake <no-reply@cake.local>"
    assert parsed["To"] == "an@example.com"
    assert parsed["Message-ID"] == f"<{delivery_id}@notifications.cake>"
    assert parsed.get_content().rstrip("\n") == body
