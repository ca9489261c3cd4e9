"""medray."""
