"""Medical image input and output: CT volumes, masks, U/S sequences, transforms."""
