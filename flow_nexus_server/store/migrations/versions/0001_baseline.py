"""Baseline: the schema of 0.1.0, which Base.metadata.create_all made before there were migrations.

A database of that release has exactly these tables and is stamped at this revision unchanged.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    _clusters()
    _events()
    _nodes()
    _training_sessions()
    _checkpoints()
    _metric_samples()


def _clusters() -> None:
    op.create_table(
        "clusters",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("topology", sa.String(length=16), nullable=False),
        sa.Column("architecture", sa.String(length=16), nullable=False),
        sa.Column("consensus", sa.String(length=32), nullable=False),
        sa.Column("launcher", sa.String(length=16), nullable=False),
        sa.Column("backend", sa.String(length=8), nullable=False),
        sa.Column("max_nodes", sa.Integer(), nullable=False),
        sa.Column("auto_healing", sa.Boolean(), nullable=False),
        sa.Column("token", sa.String(length=128), nullable=False),
        sa.Column("directory", sa.Text(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("connected_topology", sa.String(length=16), nullable=True),
        sa.Column("needs_connect_reason", sa.Text(), nullable=True),
        sa.Column("store_host", sa.String(length=64), nullable=True),
        sa.Column("store_port", sa.Integer(), nullable=True),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("terminated_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id")
    )
    op.create_index("ix_clusters_status", "clusters", ["status"])


def _events() -> None:
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("cluster_id", sa.String(length=32), nullable=False),
        sa.Column("session_id", sa.String(length=32), nullable=True),
        sa.Column("node_id", sa.String(length=32), nullable=True),
        sa.Column("time", sa.Float(), nullable=False),
        sa.Column("kind", sa.String(length=48), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id")
    )
    op.create_index("ix_events_cluster_id", "events", ["cluster_id"])
    op.create_index("ix_events_session_id", "events", ["session_id"])


def _nodes() -> None:
    op.create_table(
        "nodes",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("cluster_id", sa.String(length=32), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("model", sa.String(length=16), nullable=False),
        sa.Column("capabilities", sa.JSON(), nullable=False),
        sa.Column("layers", sa.JSON(), nullable=True),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("sandbox", sa.Text(), nullable=False),
        sa.Column("launcher_ref", sa.String(length=128), nullable=True),
        sa.Column("host", sa.String(length=64), nullable=True),
        sa.Column("port", sa.Integer(), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("rank", sa.Integer(), nullable=True),
        sa.Column("generation", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("stopped_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["cluster_id"], ["clusters.id"]),
        sa.PrimaryKeyConstraint("id")
    )
    op.create_index("ix_nodes_cluster_id", "nodes", ["cluster_id"])
    op.create_index("ix_nodes_status", "nodes", ["status"])


def _training_sessions() -> None:
    op.create_table(
        "training_sessions",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("cluster_id", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("final_metrics", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["cluster_id"], ["clusters.id"]),
        sa.PrimaryKeyConstraint("id")
    )
    op.create_index("ix_training_sessions_cluster_id", "training_sessions", ["cluster_id"])
    op.create_index("ix_training_sessions_status", "training_sessions", ["status"])


def _checkpoints() -> None:
    op.create_table(
        "checkpoints",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("session_id", sa.String(length=32), nullable=False),
        sa.Column("cluster_id", sa.String(length=32), nullable=False),
        sa.Column("node_id", sa.String(length=32), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["session_id"], ["training_sessions.id"]),
        sa.PrimaryKeyConstraint("id")
    )
    op.create_index("ix_checkpoints_cluster_id", "checkpoints", ["cluster_id"])
    op.create_index("ix_checkpoints_session_id", "checkpoints", ["session_id"])


def _metric_samples() -> None:
    op.create_table(
        "metric_samples",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("session_id", sa.String(length=32), nullable=False),
        sa.Column("node_id", sa.String(length=32), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("time", sa.Float(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=48), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["session_id"], ["training_sessions.id"]),
        sa.PrimaryKeyConstraint("id")
    )
    op.create_index("ix_metric_samples_name", "metric_samples", ["name"])
    op.create_index("ix_metric_samples_session_id", "metric_samples", ["session_id"])


def downgrade() -> None:
    op.drop_table("metric_samples")
    op.drop_table("checkpoints")
    op.drop_table("training_sessions")
    op.drop_table("nodes")
    op.drop_table("events")
    op.drop_table("clusters")
