"""Feature-map modules (kind ``vision``): 2-D-only attention over ``(B, C, H, W)`` maps, selected through
:class:`fastattn.Attention2d`."""
