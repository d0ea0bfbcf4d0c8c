"""labels-py: the `labels` pod mutator written in Python.

Built with componentize-py against keel's WIT (wit/v0.1.0, world `policy`):

    componentize-py -d wit/v0.1.0 -w policy componentize app -o labels-py.wasm

componentize-py generates the `wit_world` package from the WIT; each exported interface is a
class of this module with the interface's name. The world exports every policy role, so the
roles this plugin does not play answer `internal`, and its metadata lists only
`pod-mutator`: the host calls only the roles the metadata names.

Configuration (the same table as `labels`):

    labels = { team = "platform" }                  # added unless the pod has the key
    node_selector = { "kubernetes.io/arch" = "amd64" }
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host, types

NAME = "labels-py"
VERSION = "0.1.0"
KEYS = ("labels", "node_selector")

# One instance serves one job: `configure` runs first, then the role calls.
_settings = {"labels": {}, "node_selector": {}}


def _invalid(message: str) -> Err:
    # Raising Err(...) is how componentize-py returns the `err` case of a WIT result.
    return Err(types.PluginError_InvalidConfig(message))


class Plugin(exports.Plugin):
    def metadata(self) -> types.PluginInfo:
        return types.PluginInfo(name=NAME, version=VERSION, roles=[types.Role.POD_MUTATOR])

    def configure(self, config: str) -> None:
        table = json.loads(config or "{}")
        unknown = sorted(set(table) - set(KEYS))
        if unknown:
            # Same words as serde's, so the host points at the key's line in config.toml.
            raise _invalid(f"plugin table: unknown field `{unknown[0]}`, expected one of `labels`, `node_selector`")
        for key in KEYS:
            value = table.get(key, {})
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise _invalid(f"plugin table: `{key}` must be a table of strings")
            _settings[key] = value


class PodMutator(exports.PodMutator):
    def mutate(self, ctx: types.Context, pod: str) -> str:
        pod = json.loads(pod)
        labels = pod.setdefault("metadata", {}).setdefault("labels", {})
        for key, value in _settings["labels"].items():
            # Existing labels stay, including the host's own (it refuses a pod where they changed).
            labels.setdefault(key, value)
        if _settings["node_selector"]:
            pod.setdefault("spec", {}).setdefault("nodeSelector", {}).update(_settings["node_selector"])
        host.log(host.LogLevel.DEBUG, f"labelled pod for job {ctx.job.id}")
        return json.dumps(pod)


def _not_implemented(role: str) -> Err:
    return Err(types.PluginError_Internal(f"plugin {NAME} does not implement role {role}"))


class PullPolicy(exports.PullPolicy):
    def decide(self, ctx, request):
        raise _not_implemented("pull-policy")


class Overwrites(exports.Overwrites):
    def review(self, ctx, requested):
        raise _not_implemented("overwrites")
