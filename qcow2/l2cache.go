package qcow2

import (
	"container/list"
	"sync"
)

// L2 cache limits. The cache grows lazily, one table (one cluster) at a
// time, so an image whose header promises huge tables costs nothing until
// its tables are read, and never more than the limit.
const (
	DefaultL2CacheBytes = 16 << 20
	MaxL2CacheBytes     = 32 << 20
)

// l2Cache is an LRU of L2 tables keyed by their host offset, bounded in
// bytes. Tables are never modified or reused after insertion, so a slice
// handed out stays valid after eviction; that makes lookups safe under
// concurrent ReadAt calls without copying.
type l2Cache struct {
	mu       sync.Mutex
	maxBytes int64
	curBytes int64
	order    *list.List // front is most recently used; values are *l2CacheEntry
	byOffset map[int64]*list.Element
}

type l2CacheEntry struct {
	offset int64
	table  []byte
}

func newL2Cache(maxBytes int64) *l2Cache {
	return &l2Cache{maxBytes: maxBytes, order: list.New(), byOffset: map[int64]*list.Element{}}
}

func (c *l2Cache) get(offset int64) ([]byte, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	el, ok := c.byOffset[offset]
	if !ok {
		return nil, false
	}
	c.order.MoveToFront(el)
	return el.Value.(*l2CacheEntry).table, true
}

// put inserts a table, evicting the least recently used ones to stay within
// maxBytes. A table is always kept even if it alone exceeds the limit, so
// the current lookup can use it.
func (c *l2Cache) put(offset int64, table []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.byOffset[offset]; ok { // loaded concurrently by another reader
		c.order.MoveToFront(el)
		return
	}
	for c.order.Len() > 0 && c.curBytes+int64(len(table)) > c.maxBytes {
		oldest := c.order.Back()
		e := oldest.Value.(*l2CacheEntry)
		c.order.Remove(oldest)
		delete(c.byOffset, e.offset)
		c.curBytes -= int64(len(e.table))
	}
	c.byOffset[offset] = c.order.PushFront(&l2CacheEntry{offset: offset, table: table})
	c.curBytes += int64(len(table))
}
