"""Evaluate a traced program equation by equation, addressing values by the analysis' ids.

Both the masked model (`gates`) and the pruned program (`program`) run the model's own traced
jaxpr rather than its Python code. They share this walker: it evaluates the nested jaxpr (calls
included, so JAX's sharing of one sub-jaxpr between identical calls is respected), and offers
hooks for every value (by its id in `TracedProgram`) and every primitive equation (by its index in
`TracedProgram.eqns`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jax.extend import core as jcore

from jaxprune.trace import TracedProgram, open_jaxpr, sub_program


def bind(eqn: Any, invals: Sequence[Any], params: Any = None) -> list[Any]:
    """Applies an equation's primitive to `invals` (with `params`, default its own)."""
    bind_params = eqn.primitive.get_bind_params(eqn.params if params is None else params)
    args = list(invals)
    if isinstance(bind_params, tuple):  # older JAX returns (subfuns, params)
        subfuns, bind_params = bind_params
        args = [*subfuns, *args]
    outs = eqn.primitive.bind(*args, **bind_params)
    return list(outs) if eqn.primitive.multiple_results else [outs]


class Interpreter:
    """Runs a `TracedProgram`; subclasses override the hooks.

    Hooks:
      on_value(vid, value): every program input and equation output that has an id.
      apply(index, eqn, invals): every primitive equation (not a call), by its flat index.
      call(eqn, invals, frame): every call-like equation (jit, custom_jvp_call, remat, ...);
        by default its body is evaluated here, so the hooks see inside it.
    """

    def __init__(self, program: TracedProgram) -> None:
        self.program = program

    def run(self, args: Sequence[Any]) -> list[Any]:
        closed = self.program.closed_jaxpr
        return self.eval(closed.jaxpr, list(closed.consts), list(args), ())

    def eval(
        self, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], frame: tuple[int, ...]
    ) -> list[Any]:
        env: dict[Any, Any] = {}
        ids = self.program.frame_ids[frame]

        def read(atom: Any) -> Any:
            return atom.val if isinstance(atom, jcore.Literal) else env[atom]

        for var, value in zip(jaxpr.constvars, consts, strict=True):
            env[var] = value
        for var, value in zip(jaxpr.invars, args, strict=True):
            env[var] = self.on_value(ids.get(var), value)
        for k, eqn in enumerate(jaxpr.eqns):
            invals = [read(a) for a in eqn.invars]
            if sub_program(eqn) is not None:
                outs = self.call(eqn, invals, frame + (k,))
            else:
                outs = self.apply(self.program.eqn_index[(frame, k)], eqn, invals)
            for var, value in zip(eqn.outvars, outs, strict=True):
                if not isinstance(var, jcore.DropVar):
                    env[var] = self.on_value(ids.get(var), value)
        return [read(v) for v in jaxpr.outvars]

    def eval_call(self, eqn: Any, invals: Sequence[Any], frame: tuple[int, ...]) -> list[Any]:
        """Evaluates a call's body here (hooks included)."""
        inner, consts = open_jaxpr(sub_program(eqn))
        return self.eval(inner, consts, invals, frame)

    # -- hooks

    def on_value(self, vid: int | None, value: Any) -> Any:
        return value

    def apply(self, index: int, eqn: Any, invals: Sequence[Any]) -> list[Any]:
        return bind(eqn, invals)

    def call(self, eqn: Any, invals: Sequence[Any], frame: tuple[int, ...]) -> list[Any]:
        return self.eval_call(eqn, invals, frame)


def frames_holding(program: TracedProgram, indices: set[int], values: set[int]) -> set[tuple]:
    """The frames of call equations whose body holds one of the equations `indices`, or produces
    one of `values` that is not also one of the call's own outputs (those can be handled after
    the call)."""
    found: set[tuple[int, ...]] = set()

    def visit(jaxpr: Any, frame: tuple[int, ...], exported: set[int]) -> bool:
        ids = program.frame_ids[frame]
        hit = False
        for k, eqn in enumerate(jaxpr.eqns):
            outs = {ids.get(v) for v in eqn.outvars if not isinstance(v, jcore.DropVar)}
            sub = sub_program(eqn)
            if sub is not None:
                inner_hit = visit(open_jaxpr(sub)[0], frame + (k,), exported | outs)
                if inner_hit:
                    found.add(frame + (k,))
            else:
                inner_hit = program.eqn_index[(frame, k)] in indices or bool(
                    (outs & values) - exported
                )
            hit = hit or inner_hit
        return hit

    visit(program.closed_jaxpr.jaxpr, (), set())
    return found
