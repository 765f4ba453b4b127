"""The backdoor room: poisoning, the embedding splice, planting, Overwrite SFT, SANDE, ASR."""
