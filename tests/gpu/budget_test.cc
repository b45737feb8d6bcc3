// The one budget formula (gpu/budget.h): both zones are fractions of ALL clusters, never more
// than exist together.
#include "gpu/budget.h"

#include <gtest/gtest.h>

namespace kvwave::gpu {
namespace {

TEST(BudgetTest, DefaultBudgetsAreFractionsOfAllClusters) {
  // 1.8% + 23.2% of 1000 clusters: ceil(18) and ceil(232), not 23.2% of the 982 left.
  const ZoneSizes z = SizeZones(0.018, 0.232, 1000);
  EXPECT_EQ(z.retrieval, 18);
  EXPECT_EQ(z.estimation, 232);
  // Not whole numbers: rounded up.
  const ZoneSizes y = SizeZones(0.018, 0.232, 1001);
  EXPECT_EQ(y.retrieval, 19);    // 18.018
  EXPECT_EQ(y.estimation, 233);  // 232.232
}

TEST(BudgetTest, RetrievalPlusTheRestCoversEveryCluster) {
  for (int64_t c : {1, 7, 100, 999, 1000, 1023, 65536}) {
    const ZoneSizes z = SizeZones(0.018, 0.982, c);
    EXPECT_EQ(z.retrieval + z.estimation, c) << c;
  }
}

TEST(BudgetTest, NeverMoreThanExist) {
  for (int64_t c : {0, 1, 2, 3, 10, 4097}) {
    for (double r : {0.0, 0.01, 0.5, 0.99, 1.0}) {
      for (double e : {0.0, 0.01, 0.5, 1.0}) {
        const ZoneSizes z = SizeZones(r, e, c);
        EXPECT_GE(z.retrieval, 0);
        EXPECT_GE(z.estimation, 0);
        EXPECT_LE(z.retrieval, c);
        EXPECT_LE(z.retrieval + z.estimation, c) << c << " " << r << " " << e;
      }
    }
  }
  EXPECT_EQ(SizeZones(1.0, 0.5, 40).retrieval, 40);
  EXPECT_EQ(SizeZones(1.0, 0.5, 40).estimation, 0);
  EXPECT_EQ(SizeZones(0.0, 0.0, 40).retrieval + SizeZones(0.0, 0.0, 40).estimation, 0);
}

TEST(BudgetTest, FloatingPointProductsDoNotRoundUpAWholeNumber) {
  // 0.25 * 1000 and 0.07 * 100 are not exact in binary floating point.
  EXPECT_EQ(BudgetedClusters(0.25, 1000), 250);
  EXPECT_EQ(BudgetedClusters(0.07, 100), 7);
  EXPECT_EQ(BudgetedClusters(0.1, 30), 3);
  // Any positive budget of a non-empty set takes at least one cluster.
  EXPECT_EQ(BudgetedClusters(1e-6, 10), 1);
  EXPECT_EQ(BudgetedClusters(-0.5, 10), 0);
}

}  // namespace
}  // namespace kvwave::gpu
