"""Foundations every app shares: modules here import no app (marketplace, fleet or billing)."""
