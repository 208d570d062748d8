"""``loramux`` (``python -m loramux.client``): a command line for a loramux server.

    loramux generate --adapter math "Prove that"      # streams the completion to stdout
    loramux generate --mix math=0.7,poet=0.3 --logprobs 5 "Prove that"   # a mix; each token's top-5 on stderr
    loramux generate --message system:"Be brief." --message user:"Hi"      # a conversation (chat template)
    loramux tokenize "Prove that"                     # the token ids and their count
    loramux adapters list
    loramux adapters load poet /srv/adapters/poet [--pinned] [--replace] [--revision R] [--subfolder S]
    loramux adapters get poet
    loramux adapters set poet          # default adapter ("" or --base: the bare base model)
    loramux adapters unload poet [--allow-missing]
    loramux health [SERVICE]

The server address comes from --target, else $LORAMUX_TARGET, else 127.0.0.1:50051. Exit status: 0 on success,
1 when the server returned an error (printed on stderr as CODE REASON: message), 2 for bad command lines.

Several replicas (adapter changes are per replica; see loramux.client.targets):

    loramux --target 10.0.0.5:50051,10.0.0.6:50051 adapters load poet /srv/adapters/poet
    loramux --target dns:///loramux-replicas.default.svc.cluster.local:50051 adapters set poet

``adapters ...`` and ``health`` then run on every replica, each one's output under a ``== TARGET`` header and a
summary on stderr; the exit status is 1 if any replica failed. ``generate`` and ``tokenize`` take one target.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TextIO

import grpc

from loramux.client import DEFAULT_TARGET, Completion, LoramuxClient, LoramuxRpcError, TextChunk
from loramux.client import targets as fleet

FAN_OUT_COMMANDS = ("adapters", "health")  # the commands that may run on every replica


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loramux", description="loramux command-line client")
    p.add_argument(
        "--target",
        action="append",
        help=f"server address (default $LORAMUX_TARGET or {DEFAULT_TARGET}); repeatable, comma lists and "
        "dns:///HOST:PORT (every address HOST resolves to) run adapters/health commands on every replica",
    )
    p.add_argument("--timeout", type=float, help="deadline of each call in seconds (default: none)")
    p.add_argument("--tls-ca-file", help="connect with TLS, trusting this CA's PEM (default: plaintext)")
    p.add_argument(
        "--token-file",
        help="file holding the bearer token for servers that require one (default: $LORAMUX_TOKEN, if set)",
    )
    commands = p.add_subparsers(dest="command", required=True)

    g = commands.add_parser("generate", help="stream a completion")
    _prompt_arguments(g)
    which = g.add_mutually_exclusive_group()
    which.add_argument("--adapter", help="adapter name (default: the server's default adapter)")
    which.add_argument("--base", action="store_true", help="use the bare base model")
    which.add_argument("--mix", type=_mix, metavar="A=W,B=W", help="a weighted mix of adapters, e.g. a=0.7,b=0.3")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--min-new-tokens", type=int, default=0)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--min-p", type=float)
    g.add_argument("--typical-p", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--presence-penalty", type=float)
    g.add_argument("--frequency-penalty", type=float)
    g.add_argument("--stop", action="append", default=[], help="stop sequence; repeatable")
    g.add_argument("--stop-token-id", type=int, action="append", default=[], help="stop token id; repeatable")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--logprobs", type=int, metavar="N", help="print each token's log-probability and top N on stderr")
    g.add_argument("--request-id", default="")
    g.add_argument("--quiet", action="store_true", help="do not print the usage summary on stderr")

    t = commands.add_parser("tokenize", help="the token ids a prompt (or conversation) gives, and their count")
    _prompt_arguments(t)

    a = commands.add_parser("adapters", help="manage adapters").add_subparsers(dest="action", required=True)
    a.add_parser("list", help="list loaded adapters")
    get = a.add_parser("get", help="show one adapter")
    get.add_argument("name")
    load = a.add_parser("load", help="load an adapter from a server folder or a Hub repo id")
    load.add_argument("name")
    load.add_argument("source")
    load.add_argument("--revision", default="")
    load.add_argument("--subfolder", default="")
    load.add_argument("--replace", action="store_true")
    load.add_argument("--pinned", action="store_true")
    unload = a.add_parser("unload", help="unload an adapter")
    unload.add_argument("name")
    unload.add_argument("--allow-missing", action="store_true")
    set_ = a.add_parser("set", help="set the default adapter")
    set_.add_argument("name", nargs="?", default="")
    set_.add_argument("--base", action="store_true", help="make the bare base model the default")

    h = commands.add_parser("health", help="health status")
    h.add_argument("service", nargs="?", default="")
    return p


def _prompt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="the prompt text (or give --message ...)")
    parser.add_argument(
        "--message", type=_message, action="append", metavar="ROLE:CONTENT", help="a chat message; repeatable"
    )
    parser.add_argument("--chat", action="store_true", help="render the prompt with the model's chat template")


def _message(text: str) -> tuple[str, str]:
    role, sep, content = text.partition(":")
    if not sep or not role:
        raise argparse.ArgumentTypeError(f"expected ROLE:CONTENT (got {text!r})")
    return role, content


def _mix(text: str) -> list[tuple[str, float]]:
    pairs = []
    for part in text.split(","):
        name, sep, weight = part.partition("=")
        try:
            pairs.append((name, float(weight)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected NAME=WEIGHT,... (got {text!r})") from None
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"expected NAME=WEIGHT,... (got {text!r})")
    return pairs


def _prompt_of(args: argparse.Namespace) -> tuple[str | None, list[tuple[str, str]] | None]:
    if (args.prompt is None) == (args.message is None):
        raise SystemExit("loramux: give a prompt or --message ROLE:CONTENT ..., not both and not neither")
    return args.prompt, args.message


def run_generate(client: LoramuxClient, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
    prompt, messages = _prompt_of(args)
    options: dict = {"messages": messages} if messages is not None else {}
    if args.mix:
        options["adapter_mix"] = args.mix
    else:
        options["adapter"] = "" if args.base else args.adapter
    if args.logprobs is not None:
        options.update(logprobs=True, top_logprobs=args.logprobs)
    events = client.generate_events(
        prompt,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        typical_p=args.typical_p,
        seed=args.seed,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        stop=args.stop,
        stop_token_ids=args.stop_token_id,
        ignore_eos=args.ignore_eos,
        apply_chat_template=args.chat,
        request_id=args.request_id,
        **options,
    )
    for event in events:
        if isinstance(event, TextChunk):
            out.write(event.text)
            out.flush()
            for lp in event.logprobs:
                top = " ".join(f"{t}:{v:.3f}" for t, v in lp.top)
                err.write(f"  token {lp.token_id} logprob {lp.logprob:.4f}" + (f"  top {top}" if top else "") + "\n")
        elif isinstance(event, Completion):
            out.write("\n")
            if not args.quiet:
                err.write(_usage_line(event) + "\n")


def _usage_line(done: Completion) -> str:
    mix = ",".join(f"{m.name}={m.weight:g}" for m in done.adapter_mix)
    adapter = f"mix {mix}" if mix else done.adapter or "(base)"
    seed = f", seed {done.seed}" if done.seed is not None else ""
    replica = f"; replica {done.replica}" if done.replica else ""
    return (
        f"[{done.finish_reason}; adapter {adapter} v{done.adapter_version}; prompt {done.prompt_tokens} tokens"
        f"{f' ({done.cached_prompt_tokens} cached)' if done.cached_prompt_tokens else ''}, "
        f"completion {done.completion_tokens} tokens{seed}; request {done.request_id}{replica}]"
    )


def run_adapters(client: LoramuxClient, args: argparse.Namespace, out: TextIO) -> None:
    if args.action == "list":
        adapters = client.list_adapters()
        default = next((a.name for a in adapters if a.is_default), "")
        out.write(f"{'NAME':<24} {'RANK':>4} {'VER':>3} {'PIN':>3} {'DEF':>3}  SOURCE\n")
        for a in adapters:
            flags = ("yes" if a.pinned else "", "yes" if a.is_default else "")
            out.write(f"{a.name:<24} {a.rank:>4} {a.version:>3} {flags[0]:>3} {flags[1]:>3}  {a.source}\n")
        out.write(f"default adapter: {default or '(base model)'}\n")
    elif args.action == "get":
        out.write(str(client.get_adapter(args.name)))
    elif args.action == "load":
        response = client.load_adapter(
            args.name,
            args.source,
            revision=args.revision,
            subfolder=args.subfolder,
            replace=args.replace,
            pinned=args.pinned,
        )
        state = "already loaded" if response.already_loaded else "loaded"
        out.write(f"{state}: {response.adapter.name} (rank {response.adapter.rank}, v{response.adapter.version})\n")
    elif args.action == "unload":
        gone = client.unload_adapter(args.name, allow_missing=args.allow_missing)
        out.write(f"unloaded: {gone.name}\n" if gone is not None else f"not loaded: {args.name}\n")
    elif args.action == "set":
        response = client.set_adapter("" if args.base else args.name)
        new = response.adapter.name if response.HasField("adapter") else "(base model)"
        out.write(f"default adapter: {new} (was {response.previous_default_adapter or '(base model)'})\n")


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    args = build_parser().parse_args(argv)
    try:
        targets = fleet.expand(args.target or [os.environ.get("LORAMUX_TARGET") or DEFAULT_TARGET])
    except fleet.TargetError as exc:
        err.write(f"loramux: {exc}\n")
        return 2
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            token = f.read().strip() or None
    else:
        token = os.environ.get("LORAMUX_TOKEN") or None
    credentials = None
    if args.tls_ca_file:
        with open(args.tls_ca_file, "rb") as ca:
            credentials = grpc.ssl_channel_credentials(root_certificates=ca.read())

    def command(target: str, out: TextIO, err: TextIO) -> int:
        with LoramuxClient(target, timeout=args.timeout, token=token, credentials=credentials) as client:
            return run_command(client, args, out, err)

    if len(targets) == 1:
        return command(targets[0], out, err)
    if args.command not in FAN_OUT_COMMANDS:
        err.write(f"loramux: {args.command} goes to one server (a load balancer's address lets it choose)\n")
        return 2
    return fleet.report(fleet.fan_out(targets, command), out, err)


def run_command(client: LoramuxClient, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """One command against one server: its exit status."""
    try:
        if args.command == "generate":
            run_generate(client, args, out, err)
        elif args.command == "tokenize":
            prompt, messages = _prompt_of(args)
            ids = client.tokenize(prompt, messages=messages, apply_chat_template=args.chat)
            out.write(f"{len(ids)} tokens: {' '.join(map(str, ids))}\n")
        elif args.command == "adapters":
            run_adapters(client, args, out)
        else:
            out.write(client.health(args.service) + "\n")
    except LoramuxRpcError as exc:
        out.flush()
        err.write(f"error: {exc}\n")
        for field, description in exc.field_violations:
            err.write(f"  {field}: {description}\n")
        for _, subject, description in exc.precondition_violations:
            err.write(f"  {subject}: {description}\n")
        return 1
    except KeyboardInterrupt:  # Ctrl-C mid-stream: the call is cancelled on the way out
        err.write("\ninterrupted\n")
        return 130
    return 0
