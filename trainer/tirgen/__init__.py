"""TIRGen: tool-integrated reasoning data from an actor and a critic (`python -m trainer.tirgen`)."""
