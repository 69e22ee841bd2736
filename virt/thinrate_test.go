package virt

import (
	"testing"
	"time"
)

// The chunk follows the guest's write rate: the pool's chunk for a slow
// guest, what a fast one writes in growthLead, and back down when it
// slows.
func TestThinChunkFollowsWriteRate(t *testing.T) {
	c := NewThinController(nil, nil)
	const pool = 64 << 20
	if got := c.chunkFor("v", pool); got != pool {
		t.Fatalf("chunk before any crossing = %d, want the pool's %d", got, pool)
	}
	now := time.Unix(1000, 0)
	c.observe("v", 100<<20, now)
	c.observe("v", 110<<20, now.Add(time.Second)) // 10 MiB/s: 20 MiB in growthLead
	if got := c.chunkFor("v", pool); got != pool {
		t.Fatalf("chunk at 10 MiB/s = %d, want the pool's %d", got, pool)
	}
	c.observe("v", 1110<<20, now.Add(2*time.Second)) // 1000 MiB/s: 2000 MiB in growthLead
	want := int64(2000<<20+pool-1) / pool * pool
	if got := c.chunkFor("v", pool); got != want {
		t.Fatalf("chunk at 1000 MiB/s = %d, want %d (whole pool chunks covering growthLead)", got, want)
	}
	for i := 3; i < 12; i++ { // slow again: 1 MiB/s
		c.observe("v", int64(1110+i)<<20, now.Add(time.Duration(i)*time.Second))
	}
	if got := c.chunkFor("v", pool); got != pool {
		t.Fatalf("chunk after the guest slowed down = %d, want the pool's %d", got, pool)
	}
	if got := c.largestChunk("v"); got != want {
		t.Fatalf("largestChunk = %d, want %d", got, want)
	}
}

// A threshold crossing and an allocation read that come milliseconds
// apart do not make a rate: 64 MiB between them over 5 ms would be
// 12.8 GiB/s, and a growth of tens of GiB for a guest that writes 100 MiB/s.
func TestThinRateIgnoresCloseObservations(t *testing.T) {
	c := NewThinController(nil, nil)
	const pool = 1 << 30
	now := time.Unix(1000, 0)
	c.observe("v", 1<<30, now)
	c.observe("v", 1<<30+64<<20, now.Add(5*time.Millisecond))
	if got := c.chunkFor("v", pool); got != pool {
		t.Fatalf("chunk after two observations 5 ms apart = %d, want the pool's %d", got, pool)
	}
	// The next observation measures from the first: 100 MiB/s over 2 s.
	c.observe("v", 1<<30+200<<20, now.Add(2*time.Second))
	c.mu.Lock()
	rate := c.growth["v"].rate
	c.mu.Unlock()
	if want := float64(100 << 20); rate != want {
		t.Fatalf("rate = %.0f B/s, want %.0f (200 MiB over the 2 s since the first observation)", rate, want)
	}
	if got := c.chunkFor("v", pool); got != pool {
		t.Fatalf("chunk at 100 MiB/s = %d, want the pool's %d", got, pool)
	}
}
