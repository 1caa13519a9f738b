"""Draft reports (SRs) and their delivery to each destination.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04 20:25:10.599671

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import riha_node.models


# revision identifiers, used by Alembic.
revision: str = '0002'
down_revision: Union[str, Sequence[str], None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('reports',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('series_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('rel_path', sa.String(length=300), nullable=False),
    sa.Column('findings', sa.Text(), nullable=False),
    sa.Column('model_version', sa.String(length=64), nullable=False),
    sa.Column('source_instances', sa.Integer(), nullable=False),
    sa.Column('predecessor_id', sa.Integer(), nullable=True),
    sa.Column('created_at', riha_node.models.UTCDateTime(), nullable=False),
    sa.Column('timings', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['predecessor_id'], ['reports.id'], ),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sop_instance_uid')
    )
    with op.batch_alter_table('reports', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_reports_study_id'), ['study_id'], unique=False)

    op.create_table('exports',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('report_id', sa.Integer(), nullable=False),
    sa.Column('destination', sa.String(length=16), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', riha_node.models.UTCDateTime(), nullable=False),
    sa.Column('lease_expires_at', riha_node.models.UTCDateTime(), nullable=True),
    sa.Column('last_status', sa.Text(), nullable=True),
    sa.Column('delivered_at', riha_node.models.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['report_id'], ['reports.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('exports', schema=None) as batch_op:
        batch_op.create_index('ix_exports_due', ['state', 'next_attempt_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_exports_report_id'), ['report_id'], unique=False)



def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('exports', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_exports_report_id'))
        batch_op.drop_index('ix_exports_due')

    op.drop_table('exports')
    with op.batch_alter_table('reports', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_reports_study_id'))

    op.drop_table('reports')
