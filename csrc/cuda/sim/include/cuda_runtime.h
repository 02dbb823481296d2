// Simulator stand-in for the CUDA header of this name (see ../simt.h).
#pragma once
#include "../simt.h"
