"""OpenAssistant message trees (oasst1 trees and nested message exports) -> conversations.

A row is a tree: either {message_tree_id, prompt: <root message>} or a root message itself, each
message holding its `replies`. Deleted messages and ones that failed review are pruned, and so are
prompter messages nobody answered (a conversation should end on an answer). Option `oasst_paths`:
- "best" (default): one conversation per tree, taking at each level the reply with the lowest
  `rank` (0 is best); unranked replies come after ranked ones, by their `labels.quality` score,
  highest first; ties by their order in the file;
- "all": one conversation per root-to-leaf path.
Meta keeps the tree id, the root's language and the message ids of the path.
"""

from __future__ import annotations

from curate.formats.base import FormatOptions, RecordError, register, require_text, text_of
from curate.records import message

ROLE = {"prompter": "user", "assistant": "assistant"}
MESSAGE_KEYS = ("message_id", "parent_id", "text", "role", "replies")


def is_oasst(row: dict) -> bool:
    if "message_tree_id" in row and isinstance(row.get("prompt"), dict):
        return True
    return "message_id" in row and "text" in row and "role" in row and "replies" in row


def _alive(msg: dict) -> bool:
    return not msg.get("deleted") and msg.get("review_result") is not False


def _replies(msg: dict) -> list[dict]:
    """Live replies, without prompter messages that have no live answer below them."""
    out = []
    for reply in msg.get("replies") or ():
        if not isinstance(reply, dict):
            raise RecordError(f"reply is {type(reply).__name__}, expected a message object")
        if _alive(reply) and (reply.get("role") != "prompter" or _replies(reply)):
            out.append(reply)
    return out


def _quality(msg: dict) -> float:
    """The reviewers' quality label (0..1) of an unranked message, 0 when it has none."""
    labels = msg.get("labels")
    quality = labels.get("quality") if isinstance(labels, dict) else None
    value = quality.get("value") if isinstance(quality, dict) else None
    return float(value) if isinstance(value, (int, float)) else 0.0


def _best(replies: list[dict]) -> dict:
    def key(item: tuple[int, dict]) -> tuple:
        i, msg = item
        rank = msg.get("rank")
        if rank is None:
            return (1, -_quality(msg), i)
        return (0, rank, i)

    return min(enumerate(replies), key=key)[1]


def _paths(root: dict, mode: str) -> list[list[dict]]:
    if mode == "best":
        path = [root]
        replies = _replies(root)
        while replies:
            path.append(_best(replies))
            replies = _replies(path[-1])
        return [path]
    paths = []
    stack = [[root]]
    while stack:
        path = stack.pop()
        replies = _replies(path[-1])
        if not replies:
            paths.append(path)
        # reversed, so paths come out in file order
        stack.extend(path + [r] for r in reversed(replies))
    return paths


@register(
    "oasst", "OpenAssistant message trees (nested replies); option oasst_paths: best | all", is_oasst, 10
)
def convert(row: dict, options: FormatOptions) -> list[dict]:
    if options.oasst_paths not in ("best", "all"):
        raise RecordError(f"oasst_paths is {options.oasst_paths!r}, expected 'best' or 'all'")
    root = row["prompt"] if "message_tree_id" in row else row
    if not _alive(root):
        raise RecordError("the tree's root message is deleted or failed review")
    tree_id = row.get("message_tree_id", root.get("message_id"))
    out = []
    for path in _paths(root, options.oasst_paths):
        messages = []
        for msg in path:
            role = ROLE.get(msg.get("role"))
            if role is None:
                raise RecordError(f"message {msg.get('message_id')} has unknown role {msg.get('role')!r}")
            messages.append(message(role, text_of(msg.get("text"), "text")))
        meta = {
            "message_tree_id": tree_id,
            "lang": root.get("lang"),
            "message_ids": [m.get("message_id") for m in path],
        }
        if row.get("tree_state") is not None:
            meta["tree_state"] = row["tree_state"]
        out.append({"messages": require_text(messages), "meta": meta})
    return out
