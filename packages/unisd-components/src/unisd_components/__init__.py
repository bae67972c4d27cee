"""The UniSD mechanisms as unisd components (EMA teacher, agreement, contrastive, matching, clip)."""
