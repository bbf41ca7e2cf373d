"""The import path the shipped configs name: ``deployments.app:build_app``.

``serve.yaml``, ``serve-cluster.yaml``, ``kuberay/rayservice.yaml`` and the README point here, so
this stays put whatever moves behind it; the builder itself is `deployments.builder`.
"""

from __future__ import annotations

from deployments.builder import application, build_app, deployment_options

__all__ = ["application", "build_app", "deployment_options"]
