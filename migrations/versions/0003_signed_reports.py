"""Signed reports (ground truth from SRs and RIS imports) and the quality of each draft against them.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 23:40:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import riha_node.models


# revision identifiers, used by Alembic.
revision: str = '0003'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('signed_reports',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', sa.Integer(), nullable=True),
    sa.Column('study_uid', sa.String(length=64), nullable=True),
    sa.Column('accession_number', sa.String(length=64), nullable=True),
    sa.Column('findings', sa.Text(), nullable=True),
    sa.Column('impression', sa.Text(), nullable=True),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('source_ref', sa.String(length=255), nullable=False),
    sa.Column('signed_at', riha_node.models.UTCDateTime(), nullable=True),
    sa.Column('received_at', riha_node.models.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('source_ref')
    )
    with op.batch_alter_table('signed_reports', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_signed_reports_accession_number'), ['accession_number'], unique=False)
        batch_op.create_index(batch_op.f('ix_signed_reports_study_id'), ['study_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_signed_reports_study_uid'), ['study_uid'], unique=False)

    op.create_table('report_quality',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('report_id', sa.Integer(), nullable=False),
    sa.Column('signed_report_id', sa.Integer(), nullable=False),
    sa.Column('bleu_4', sa.Float(), nullable=False),
    sa.Column('rouge_l', sa.Float(), nullable=False),
    sa.Column('chexpert', sa.Text(), nullable=False),
    sa.Column('model_version', sa.String(length=64), nullable=False),
    sa.Column('computed_at', riha_node.models.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['report_id'], ['reports.id'], ),
    sa.ForeignKeyConstraint(['signed_report_id'], ['signed_reports.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('report_id', 'signed_report_id')
    )
    with op.batch_alter_table('report_quality', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_report_quality_report_id'), ['report_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_report_quality_signed_report_id'), ['signed_report_id'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('report_quality', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_report_quality_signed_report_id'))
        batch_op.drop_index(batch_op.f('ix_report_quality_report_id'))

    op.drop_table('report_quality')
    with op.batch_alter_table('signed_reports', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_signed_reports_study_uid'))
        batch_op.drop_index(batch_op.f('ix_signed_reports_study_id'))
        batch_op.drop_index(batch_op.f('ix_signed_reports_accession_number'))

    op.drop_table('signed_reports')
