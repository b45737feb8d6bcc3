#include "index/wave_index.h"
#include <gtest/gtest.h>
TEST(X, Y) { EXPECT_TRUE(true); }
